from services.report.server import main

main()
