"""The clinician's viewer: FastAPI app (REST API) + Gradio Blocks UI + login. See app.py."""
