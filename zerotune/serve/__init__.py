"""Serving a decoder run: the continuous-batching engine, the OpenAI-compatible HTTP server, the chat page
(``page.html``) and the terminal chat. ``zerotune serve RUN`` / ``zerotune chat RUN``."""
