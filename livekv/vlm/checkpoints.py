"""What a training run (``livekv.vlm.train``) reads and writes: the model it starts from, the finished model, and
the checkpoints a run cut short resumes from."""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

from livekv.vlm.model import DefaultVLMAdapter, build_model, build_tokenizer, load_default_vlm, object_words


def starting_model(seed: int, init: str | pathlib.Path | None = None,
                   checkpoint: pathlib.Path | None = None) -> DefaultVLMAdapter:
    """The model a run starts from: its ``checkpoint`` when resuming, else a fresh one built with ``seed``, else the
    trained ``init`` (given the two-word tokens where it predates them)."""
    if checkpoint is not None:
        return load_default_vlm(checkpoint)
    if init is None:
        tokenizer = build_tokenizer()
        return DefaultVLMAdapter(build_model(tokenizer, seed), tokenizer)
    adapter, tokenizer = load_default_vlm(init), build_tokenizer()
    return add_object_words(adapter, tokenizer) if len(tokenizer) > len(adapter.tokenizer) else adapter


def add_object_words(adapter: DefaultVLMAdapter, tokenizer) -> DefaultVLMAdapter:
    """A checkpoint whose tokenizer predates ``object_words`` (its vocabulary a prefix of ``tokenizer``'s) with the
    new words' embeddings (tied to the output) set to the mean of their two words', behind ``tokenizer``."""
    old = adapter.tokenizer.get_vocab()
    if any(tokenizer.convert_tokens_to_ids(w) != i for w, i in old.items()):
        raise ValueError("the checkpoint's vocabulary is not a prefix of the current tokenizer's")
    model = adapter.model
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for word, (a, b) in object_words().items():
            weight[tokenizer.convert_tokens_to_ids(word)] = (weight[old[a]] + weight[old[b]]) / 2
    return DefaultVLMAdapter(model, tokenizer)


def resume_state(checkpoint: pathlib.Path, settings: dict) -> dict:
    """The training state saved with ``checkpoint``, checked against the resumed run's ``settings``."""
    if not (checkpoint / "resume.pt").is_file():
        raise FileNotFoundError(f"nothing to resume: no {checkpoint / 'resume.pt'} (a run saves it at each held-out "
                                "evaluation; pass --init to go on from a finished model with a fresh schedule)")
    saved = json.loads((checkpoint / "training.json").read_text())
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"resume with the arguments of the run that saved {checkpoint}; these differ "
                         f"(saved, given): {changed}")
    return torch.load(checkpoint / "resume.pt", weights_only=True)


def save_checkpoint(adapter: DefaultVLMAdapter, checkpoint: pathlib.Path, result: dict, state: dict) -> None:
    """``save`` plus the training ``state`` (``resume.pt``), written beside ``checkpoint`` and moved in whole, so
    that a run killed while saving keeps its previous checkpoint."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(adapter, partial, result)
    torch.save(state, partial / "resume.pt")
    shutil.rmtree(checkpoint, ignore_errors=True)
    partial.rename(checkpoint)


def save(adapter: DefaultVLMAdapter, out: pathlib.Path, result: dict) -> None:
    """Model + tokenizer (as ``load_default_vlm`` reads them) and ``training.json`` (``result``) into ``out``; the
    model stays in training mode."""
    model = adapter.model.eval()
    implementation = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    adapter.tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(result, indent=1))
    model.set_attn_implementation(implementation)
    model.train()
