"""Knowledge (RAG) agent: retrieves SOPs from the vector store and writes cited guidance (KnowledgeService)."""
