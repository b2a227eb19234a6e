// A Copilot client in another language: Node.js with @grpc/grpc-js, the .proto files loaded at run time
// (protos/ as published), the bearer token in the `authorization` header. Prints one JSON object of what it saw.
//   node diagnose.mjs <host:port> <token> <photo.jpg>
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const [address, token, photoPath] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("copilot/v1/copilot.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const api = grpc.loadPackageDefinition(definition).copilot.v1;
const client = new api.CopilotService(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.add("authorization", `Bearer ${token}`);
const deadline = () => new Date(Date.now() + 60_000);

// google.rpc.Status / BadRequest, as every gRPC ecosystem decodes grpc-status-details-bin
const rpc = protobuf.parse(`
syntax = "proto3";
package google.rpc;
message Any { string type_url = 1; bytes value = 2; }
message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
message FieldViolation { string field = 1; string description = 2; string reason = 3; }
message BadRequest { repeated FieldViolation field_violations = 1; }
message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;

function call(request) {
  return new Promise((resolve) => {
    client.Diagnose(request, metadata, { deadline: deadline() }, (error, reply) => resolve({ error, reply }));
  });
}

function violations(error) {
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (!raw) return null;
  const status = rpc.lookupType("google.rpc.Status").decode(raw);
  return status.details
    .filter((d) => d.type_url.endsWith("google.rpc.BadRequest"))
    .flatMap((d) => rpc.lookupType("google.rpc.BadRequest").decode(d.value).field_violations)
    .map((v) => v.field);
}

// google.rpc.ErrorInfo: the machine-readable reason a client branches on (never the message text)
function errorInfo(error) {
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (!raw) return null;
  const status = rpc.lookupType("google.rpc.Status").decode(raw);
  const info = status.details.find((d) => d.type_url.endsWith("google.rpc.ErrorInfo"));
  if (!info) return null;
  const decoded = rpc.lookupType("google.rpc.ErrorInfo").decode(info.value);
  return { reason: decoded.reason, domain: decoded.domain, metadata: decoded.metadata };
}

const out = {};
const photo = readFileSync(photoPath);
const good = await call({
  plant_id: "PUNE-IN",
  equipment_id: "PUMP-A-7",
  problem_description: "Pump housing shows a crack and the motor is overheating",
  image: { data: photo, mime_type: "image/jpeg" },
});
if (good.error) {
  out.diagnose_error = `${good.error.code} ${good.error.details}`;
} else {
  const r = good.reply;
  out.diagnose = {
    request_id: r.request_id,
    confidence_score: r.confidence_score,
    requires_manual_review: r.requires_manual_review,
    stages: r.stages.map((s) => [s.stage, s.state]),
    defects: r.report.defects.map((d) => [d.type, d.confidence, d.box ? d.box.x_min !== undefined : false]),
    referenced_sop_ids: r.report.referenced_sop_ids,
    generated_at_seconds: r.report.generated_at ? Number(r.report.generated_at.seconds) : null,
    rendered_starts: r.report.rendered_text.split("\n")[0],
    trace_id: r.trace_id,
  };
}
const bad = await call({ plant_id: "pune", equipment_id: "X", problem_description: "short <" });
out.invalid = bad.error
  ? { code: bad.error.code, fields: violations(bad.error), error_info: errorInfo(bad.error) }
  : { answered: true };

const anonymous = await new Promise((resolve) => {
  client.Diagnose(
    { plant_id: "PUNE-IN", equipment_id: "PUMP-A-7", problem_description: "Pump overheating during operation" },
    new grpc.Metadata(),
    { deadline: deadline() },
    (error) => resolve(error ? { code: error.code, error_info: errorInfo(error) } : { code: 0 }),
  );
});
out.unauthenticated_code = anonymous.code;
out.unauthenticated_error_info = anonymous.error_info;
client.close();
console.log(JSON.stringify(out));
