"""`python -m d2f.demo`: a local web page where a D2F dLLM and an autoregressive model answer the
same prompt at once, streamed, with live counters and the D2F block pipeline (docs/demo.md).

`d2f.demo.engine` is the generation logic (no UI; what the tests drive), `d2f.demo.view` turns its
snapshots into HTML, `d2f.demo.app` is the Gradio page. Gradio is the optional `demo` extra
(`pip install -e ".[demo]"`): only `d2f.demo.app` imports it.
"""
