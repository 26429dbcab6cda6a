"""Tiny random Hugging Face models that the tests (and benchmarks) build and save themselves: nothing is downloaded.

- a BERT sequence classifier (num_labels=1) on the bundled MiniLM's WordPiece tokenizer, which has no chat
  template: the text-pair input;
- a Llama sequence classifier and a Llama causal LM on a small byte-level BPE tokenizer with a chat template;
- a GPT-2 causal LM on the same BPE tokenizer without a template (and no pad token, like GPT-2's own).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a joke about computers and the people who use them.",
    "Scores are written to SQL, batches travel through Redis to Celery workers.",
    "user: assistant: 0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def bpe_tokenizer(chat_template: str | None, pad: bool = True, vocab_size: int = 600):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    kw = {"pad_token": "<|pad|>"} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", **kw)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _llama_config(tokenizer, vocab_size: int | None = None, **extra):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def _bert_config(tokenizer, **extra):  # type: ignore[no-untyped-def]
    """A two-layer, 32-wide BERT on the bundled MiniLM's WordPiece vocabulary."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def save_bert_classifier(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from rewardq.workers.registry import default_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_bert_config(tokenizer, num_labels=1))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_llama_classifier(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = bpe_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_llama_lm(path: Path, seed: int = 0, vocab_size: int | None = None, hidden_size: int = 32) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = bpe_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = _llama_config(tokenizer, vocab_size)
    config.hidden_size = hidden_size
    config.head_dim = hidden_size // config.num_attention_heads
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_gpt2_lm(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = bpe_tokenizer(None, pad=False)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_st_encoder(path: Path, pooling: str, seed: int = 0, max_seq_length: int = 64) -> Path:
    """A tiny random BERT saved as a sentence-transformers folder (modules.json: Transformer, Pooling by ``pooling``
    ("cls" or "mean"), Normalize) on the bundled MiniLM's tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertModel

    from rewardq.workers.registry import default_encoder_path

    raw = path.parent / f".{path.name}-bert"
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(seed)
    BertModel(_bert_config(tokenizer)).save_pretrained(raw, safe_serialization=True)
    tokenizer.save_pretrained(raw)
    encoder = models.Transformer(str(raw), max_seq_length=max_seq_length)
    pool = models.Pooling(encoder.get_embedding_dimension(), pooling_mode=pooling)
    SentenceTransformer(modules=[encoder, pool, models.Normalize()], device="cpu").save(str(path))
    return path


def save_openrlhf_rm(
    path: Path, prefix: str = "value_head", seed: int = 0, mean: float = 0.25, std: float = 2.0
) -> Path:
    """A tiny Llama reward model in the layout OpenRLHF's train_rm saves: one checkpoint of the base model's weights
    (under ``model.``) and a bias-free one-output value head named ``prefix``; config.json with
    ``value_head_prefix``, ``normalize_reward`` (false, as train_rm leaves it) and the mean and std its evaluation
    writes; the class name ``RewardModel`` as architecture. A chat template."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaModel

    tokenizer = bpe_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = _llama_config(tokenizer)
    base = LlamaModel(config)
    head = torch.randn(1, config.hidden_size)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state[f"{prefix}.weight"] = head
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw.update(architectures=["RewardModel"], value_head_prefix=prefix, normalize_reward=False, mean=mean, std=std)
    (path / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(path)
    return path
