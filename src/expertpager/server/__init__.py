"""`expertpager serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one paged model, with a page
that shows the expert cache at work."""
