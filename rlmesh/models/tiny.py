"""The embedded default model: a character tokenizer, a tiny Qwen2 causal LM, its SFT and exact-match evaluation."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from rlmesh.reward import default_compute_score

# The committed base model of `python -m rlmesh.train recipe=grpo`, made by scripts/make_base_model.py.
ASSETS_PATH = Path(__file__).resolve().parents[1] / "assets"
TINY_ARITH_PATH = ASSETS_PATH / "tiny-arith"

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
# Ids 0 and 1 are pad and eos; the characters take the ids from here on, in CHARACTERS order.
FIRST_CHARACTER_ID = len(SPECIAL_TOKENS)
# Everything the synthetic arithmetic and digit_sort tasks write in their bare prompts and answers.
CHARACTERS = "0123456789+-*="
# Prompts are bare expressions ('23+45='), so the template only joins the contents: no roles, no generation prompt.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
# Room for 3-digit, 3-operand prompts plus their answers and some response budget; RoPE makes it free in parameters.
MAX_POSITIONS = 128

# hidden 128 with 2 heads gives head_dim 64, the smallest that vLLM's CPU attention accepts (16 is rejected).
# With intermediate 512 and 4 layers this is the 1.05 M-parameter model measured in DESIGN.md.
TINY_QWEN2_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": MAX_POSITIONS,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}


def build_char_tokenizer(characters: str = CHARACTERS) -> Qwen2Tokenizer:
    """A character-level tokenizer: pad (id 0), eos (id 1), then one token per character of `characters`.

    It is a Qwen2Tokenizer (a `tokenizers` BPE with no merges, so every character stays one token) because
    transformers 5 loads the tokenizer of every model_type 'qwen2' folder as Qwen2Tokenizer, whatever
    tokenizer_config.json says, rebuilding tokenizer.json's vocabulary with Qwen's pre-tokenizer and byte-level
    decoder. Building that same class here makes the tokenizer in memory identical to the one transformers and vLLM
    load from the saved folder. Like Qwen's, it has no unknown token: characters outside `characters` are dropped,
    which prompt_ids() turns into an error.
    """
    if len(set(characters)) != len(characters) or not characters:
        raise ValueError(f"characters must be a non-empty string of distinct characters, got {characters!r}")
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *characters))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # type: ignore[arg-type]  # Qwen2Tokenizer's BPE has no unknown token; say so
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# The agentic default (recipe=grpo_tool): the same characters, plus the chat's and the tool syntax's fixed strings
# as whole tokens, so that a calculator call is a dozen tokens for a character-level model. They are ordinary
# added tokens, not special ones, so that decoding keeps them (the tool-call parser reads the decoded text).
TOOL_CALL_OPEN = '<tool_call>{"name": "calculate", "arguments": {"expression": "'
TOOL_CALL_CLOSE = '"}}</tool_call>'
ASSISTANT_TOKEN = "<|assistant|>"
TOOL_TOKENS = (ASSISTANT_TOKEN, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<tool_response>", "</tool_response>")
# The user's prompt as is, each assistant turn after <|assistant|> and ended by eos, each tool result between
# <tool_response> tags; tools are not listed (the model knows its one tool).
TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}<|endoftext|>"
    "{% elif message['role'] == 'tool' %}<tool_response>{{ message['content'] }}</tool_response><|assistant|>"
    "{% else %}{{ message['content'] }}<|assistant|>{% endif %}"
    "{% endfor %}"
)


def build_tool_tokenizer() -> Qwen2Tokenizer:
    """build_char_tokenizer's characters, then TOOL_TOKENS as added tokens, with TOOL_CHAT_TEMPLATE. Every prompt
    and tool result ends on <|assistant|>, so the template needs no generation prompt of its own."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(list(TOOL_TOKENS))
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> Qwen2Config:
    """TINY_QWEN2_DEFAULTS updated by `overrides`, sized to `tokenizer`'s vocabulary and special token ids."""
    settings = {**TINY_QWEN2_DEFAULTS, **overrides}
    hidden, heads = settings["hidden_size"], settings["num_attention_heads"]
    if settings["head_dim"] * heads != hidden:
        raise ValueError(
            f"head_dim * num_attention_heads must equal hidden_size, got {settings['head_dim']} * {heads} != {hidden}; "
            "keep head_dim 64 for vLLM on CPU and set hidden_size = 64 * num_attention_heads"
        )
    return Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        **settings,
    )


def build_tiny_qwen2(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """A freshly initialised float32 tiny Qwen2 causal LM for `tokenizer` (see tiny_qwen2_config), the same per seed."""
    config = tiny_qwen2_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float()


def prompt_ids(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[int]:
    """The token ids of a verl-format row's prompt, through the chat template, as the rollout tokenizes it.

    Raises if the tokenizer dropped characters it does not know (the tiny tokenizer has no unknown token), so a
    prompt style the model cannot read fails here instead of training on a mangled prompt.
    """
    text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        unknown = sorted(set(str(text)) - set(tokenizer.decode(ids)))
        raise ValueError(
            f"prompt {text!r} has characters {unknown} outside the tokenizer's vocabulary; the tiny model reads bare "
            "prompts only (prompt_style='bare')"
        )
    return ids


def sft_example(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + ground truth + eos, with labels -100 on the prompt so only the answer and
    the eos that ends it are learned."""
    prompt = prompt_ids(tokenizer, row)
    answer = tokenizer.encode(str(row["reward_model"]["ground_truth"]), add_special_tokens=False)
    answer = [*answer, tokenizer.eos_token_id]
    return [*prompt, *answer], [-100] * len(prompt) + answer


def calculator_sft_example(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], use_tool: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one calculator episode as the agent loop lays it out: the prompt, then either the
    answer, or a calculate call, its result and the answer copied from it. Labels are -100 on the prompt and the
    tool's tokens, so only what the model samples is learned."""
    from rlmesh.envs import ChatTurns

    turns = ChatTurns(tokenizer)
    messages = [dict(message) for message in row["prompt"]]
    ids = turns.prompt_ids(messages)
    labels = [-100] * len(ids)
    answer = str(row["reward_model"]["ground_truth"])
    if use_tool:
        expression = str(row["extra_info"]["expression"])
        call = f"{TOOL_CALL_OPEN}{expression}{TOOL_CALL_CLOSE}"
        sampled = [*tokenizer.encode(call, add_special_tokens=False), tokenizer.eos_token_id]
        messages.append({"role": "assistant", "content": call})
        tool = [{"role": "tool", "name": "calculate", "content": answer}]
        between = turns.continuation_ids(messages, tool, tokenizer.eos_token_id)
        ids, labels = [*ids, *sampled, *between], [*labels, *sampled, *([-100] * len(between))]
    final = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    return [*ids, *final], [*labels, *final]


# 'constant' stops mid-training, at the peak learning rate; 'cosine' anneals to zero. At the same held-out accuracy
# the constant-schedule model is the better RL start (measured in scripts/make_base_model.py).
SFT_SCHEDULES = ("cosine", "constant")


def sft(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    warmup_steps: int = 20,
    max_grad_norm: float = 1.0,
    log_every: int = 0,
    schedule: str = "cosine",
    examples: Sequence[tuple[list[int], list[int]]] | None = None,
) -> list[float]:
    """Trains `model` in place for `steps` AdamW steps on batches drawn from `rows` (with a seeded generator, so a
    seed gives the same model), with linear warmup, then cosine decay to zero (schedule='cosine') or the peak `lr`
    to the end (schedule='constant'). `examples` ((input_ids, labels) pairs) replace the rows' sft_example.
    Returns the loss of every step."""
    if steps < 1 or not rows:
        raise ValueError(f"need steps >= 1 and at least one row, got steps={steps} and {len(rows)} rows")
    if schedule not in SFT_SCHEDULES:
        raise ValueError(f"schedule must be one of {SFT_SCHEDULES}, got {schedule!r}")
    examples = list(examples) if examples is not None else [sft_example(tokenizer, row) for row in rows]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        picked = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        width = max(len(examples[index][0]) for index in picked)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for slot, index in enumerate(picked):
            ids, targets = examples[index]
            input_ids[slot, : len(ids)] = torch.tensor(ids)
            labels[slot, : len(ids)] = torch.tensor(targets)
            attention_mask[slot, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"sft step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.perf_counter() - started:.1f}s)")
    model.eval()
    return losses


@torch.no_grad()
def greedy_token_ids(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], max_new_tokens: int = 6
) -> list[list[int]]:
    """The greedy completion token ids (up to and including the first eos) for each row's prompt, in row order.

    Prompts are batched by length, so no batch needs padding and each result equals an unbatched generate.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [prompt_ids(tokenizer, row) for row in rows]
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    completions: list[list[int]] = [[] for _ in rows]
    model.eval()
    for length, indexes in by_length.items():
        input_ids = torch.tensor([encoded[index] for index in indexes])
        output = model.generate(  # type: ignore[misc]  # transformers types generate's self as a Protocol
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for index, generated in zip(indexes, output[:, length:].tolist(), strict=True):
            # generate pads a row that stopped before the others in its batch, after its eos.
            stop = generated.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in generated else None
            completions[index] = generated[:stop]
    return completions


def greedy_responses(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], max_new_tokens: int = 6
) -> list[str]:
    """The greedy response text to each row's prompt, special tokens kept so that the eos shows ('68<|endoftext|>')."""
    completions = greedy_token_ids(model, tokenizer, rows, max_new_tokens)
    return [str(tokenizer.decode(ids, skip_special_tokens=False)) for ids in completions]


def evaluate_exact_match(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], max_new_tokens: int = 6
) -> float:
    """The fraction of `rows` whose greedy response the built-in scorer for their data_source grades correct."""
    if not rows:
        raise ValueError("evaluate_exact_match needs at least one row")
    responses = greedy_responses(model, tokenizer, rows, max_new_tokens)
    correct = 0
    for row, response in zip(rows, responses, strict=True):
        score = default_compute_score(row["data_source"], response, row["reward_model"]["ground_truth"])
        # Built-in scorers return a dict with 'acc' (exact match does); a bare float is a score in [0, 1].
        correct += bool(score["acc"]) if isinstance(score, dict) else score >= 1.0
    return correct / len(rows)


def save_tiny_model(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out: str | Path, notes: str | None = None
) -> Path:
    """Writes `model` and `tokenizer` to `out` in Hugging Face layout (config.json, model.safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json), plus README.md holding
    `notes` when given. Returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Only the stop and pad ids: vLLM takes sampling defaults (temperature, top_p, ...) from this file.
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 no longer writes this file; older loaders and some tools still look for it.
    special_tokens = {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")
    if notes is not None:
        (out / "README.md").write_text(notes)
    return out
