"""Adapters to third-party frameworks (optional extras; none is imported by nestvec itself).

Import the one you need explicitly, e.g. `from nestvec.integrations.langchain import NestvecVectorStore`
(needs the `langchain` extra: `pip install nestvec[langchain]`).
"""
