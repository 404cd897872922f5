"""A request body -> the block hashes of its prompt, for prefix routing at the ingress.

The ingress holds the model's tokenizer (no weights) and renders prompts exactly as a replica
does (the same schemas, chat template and block size), so its hashes are the keys the replica's
prefix cache will hold. A body it cannot read gives no hashes: the replica answers the error.
"""

from __future__ import annotations

import json

from kvcache.api.llm import chat_template_ids
from kvcache.replicas.routing import prompt_block_hashes
from kvcache.server.routes import chat_prompt_ids
from kvcache.server.schemas import ChatCompletionRequest, CompletionRequest
from kvcache.server.structured import template_renders_tools, tool_plan


class PromptHasher:
    def __init__(self, tokenizer, block_size: int):
        self.tokenizer, self.block_size = tokenizer, block_size

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """`LLM.chat_ids` without the weights (what `routes.chat_prompt_ids` calls)."""
        return chat_template_ids(self.tokenizer, messages, tools)

    def prompt_ids(self, path: str, body: bytes) -> list[int]:
        """The token ids of the request's prompt (the first one of a completions batch); [] if none."""
        try:
            data = json.loads(body)
            if path == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(data)
                renders = bool(chat.tools) and template_renders_tools(self.tokenizer)
                return chat_prompt_ids(self, chat, tool_plan(chat.tools, chat.tool_choice, renders))
            if path == "/v1/completions":
                prompt = CompletionRequest.model_validate(data).prompt
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                    prompt = prompt[0]
                return list(self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
        except Exception:  # noqa: BLE001 - a bad body is the replica's to refuse, with its own sentence
            return []
        return []

    def hashes(self, path: str, body: bytes) -> list[int]:
        return prompt_block_hashes(self.prompt_ids(path, body), self.block_size)
