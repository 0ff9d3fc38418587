"""Retrieval-augmented generation over nestvec collections (embedded or remote)."""

from nestvec.rag.context import Passage
from nestvec.rag.generators import (
    Generator,
    OpenAIGenerator,
    TransformersGenerator,
    load_generator,
    smollm2_folder,
)
from nestvec.rag.pipeline import RAG, Answer

__all__ = ["RAG", "Answer", "Generator", "OpenAIGenerator", "Passage", "TransformersGenerator", "load_generator",
           "smollm2_folder"]
