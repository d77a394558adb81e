"""``gptft serve``: a finished run behind an OpenAI-compatible HTTP API.

``app.py`` holds the routes and the request checks, ``engine.py`` the thread that owns the model
and batches the requests on it, ``prompts.py`` how chat messages become a prompt.
"""
