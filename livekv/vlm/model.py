"""The embedded default video-language model: a LLaVA-OneVision of toy size, trained from scratch on the
synthetic world (``livekv.vlm.world``) by ``livekv.vlm.train``.

It is a plain ``LlavaOnevisionForConditionalGeneration`` (a SigLIP tower on 48 px frames, patch 8: a 6 x 6 patch
grid pooled to 3 x 3 = 9 tokens per frame, one per cell of the world's grid; a 6-layer Qwen2 decoder, hidden 128) with a word-level
tokenizer over the world's vocabulary, so it runs behind the same adapter as the real LLaVA-OneVision and every
streaming method works with it unchanged.
"""

from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from livekv.quantize import check_weights
from livekv.stream.adapters import LlavaOnevisionAdapter, cast_and_quantize
from livekv.vlm import world

WEIGHTS = pathlib.Path(__file__).parent / "weights"
SPECIALS = ["<pad>", "<unk>", "<eos>", "<image>", "<video>"]
SYSTEM = "you watch a live video ."
QUESTION_TEMPLATE = "question : {question} answer :"
FRAME_SIZE = 48


# The tokenizer's two-word tokens: every "{colour} {shape}" (where_last names its object so; object index
# colour * len(SHAPES) + shape) and every "first {shape}" (first_colour's).
OBJECT_PAIRS = [(c, s) for c in world.COLOURS for s in world.SHAPES]
FIRST_PAIRS = [("first", s) for s in world.SHAPES]
OBJECT_WORDS = [f"{a}_{b}" for a, b in OBJECT_PAIRS]
FIRST_WORDS = [f"{a}_{b}" for a, b in FIRST_PAIRS]


def object_words() -> dict[str, tuple[str, str]]:
    """The tokenizer's two-word tokens and their words (``OBJECT_WORDS``, then ``FIRST_WORDS``). One token per
    object description makes a question's lookup match one key, where two words must be bound together first:
    that binding is what this small decoder got wrong (``docs/trials.md``)."""
    return dict(zip(OBJECT_WORDS + FIRST_WORDS, OBJECT_PAIRS + FIRST_PAIRS))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the special tokens, the prompt words, every word of the world's questions and
    answers, then the two-word tokens of ``object_words`` (appended, so the ids before them stay)."""
    words = SPECIALS + sorted(set(SYSTEM.split() + QUESTION_TEMPLATE.replace("{question}", "").split() + world.vocabulary()))
    merged = object_words()
    words += list(merged)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(f"{a} {b}", w) for w, (a, b) in merged.items()])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """The untrained model (about 1.9M parameters).

    Measured while choosing the shape (``livekv.vlm.train``, same steps and data): depth is what lets the decoder
    bind a question's words to one object of a frame (on "what colour is the {shape} at the {cell} ?" over 3-frame
    streams, 4 layers stayed at 50% on frames with two objects after 2000 steps, 6 layers reached 95% in 1000);
    heads of 64 dims learn the temporal lookups faster than heads of 32; rope theta 1e6 (Qwen2's) and an init
    scale of 0.05 (HF's 0.02 is tuned for wide models) speed up the first steps.
    """
    vocab = len(tokenizer)
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16384,
                         rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), initializer_range=0.05,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, image_size=FRAME_SIZE, patch_size=8, vision_use_head=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


FPS = 0.5  # the rate its training streams were sampled at


class DefaultVLMAdapter(LlavaOnevisionAdapter):
    """The LLaVA-OneVision adapter with the default model's prompt framing. ``trained_seconds``: the longest stream
    it was trained on, which bounds the context it handles (its position table is far longer)."""

    system_template = "{system}"
    question_template = QUESTION_TEMPLATE
    trained_seconds = 130.0

    @property
    def context_tokens(self) -> int:
        """The longest stream it was trained on: one clip per frame, each ``tokens_per_frame`` + a newline."""
        return int(self.trained_seconds * FPS) * (self.tokens_per_frame + 1)


def load_default_vlm(path: str | pathlib.Path = WEIGHTS, dtype: torch.dtype = torch.float32,
                     weights: str = "float32") -> DefaultVLMAdapter:
    """The trained default model (shipped in the package) behind its adapter, cast to ``dtype`` (its activations
    and the stream's KV are then in it), its language model's linear layers and ``lm_head`` stored as ``weights``
    (``livekv.quantize``: float32 leaves them in ``dtype``; bfloat16, int8, int4). The vision tower and projector
    are cast, never quantized: a decode step does not read them, and they run once per frame as a batch
    (``livekv.stream.adapters.cast_and_quantize``)."""
    path = pathlib.Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained default VLM at {path}: train it with `livekv train-vlm`")
    check_weights(weights)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    cast_and_quantize(model, dtype, weights)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    adapter = DefaultVLMAdapter(model.eval(), tokenizer)
    training = path / "training.json"
    if training.is_file():
        adapter.trained_seconds = json.loads(training.read_text()).get("max_seconds", adapter.trained_seconds)
    return adapter
