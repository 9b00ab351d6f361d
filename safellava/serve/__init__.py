"""An OpenAI-compatible HTTP server for safe captions and chat (``safellava serve``; extra ``serve``).

``protocol`` parses chat-completion requests and shapes responses and errors as the OpenAI API
does, ``media`` fetches images from data, http(s) and file URLs within the limits set, ``worker``
runs the one model from a bounded queue (batching compatible requests), and ``app`` puts them behind
Starlette routes with the key check and the body limit.
"""
