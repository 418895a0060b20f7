"""A tiny random Llama-architecture model with a real tokenizer, made here (no download).

For tests, CI and the demo, where no model weights can be fetched: a ``LlamaForCausalLM``
with random weights and a byte-level BPE tokenizer trained on a few sentences (so the
model emits arbitrary bytes, partial UTF-8 sequences included), saved in Hugging Face
format like any real checkpoint. Needs torch, tokenizers and transformers (the ``guest``
extra). ``tdxvm emulate tiny-llama OUT`` writes one.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Confidential computing keeps the model private, même en mémoire, 数据 stays sealed.",
    "Hello, how are you today? I am fine, thank you! Tell me a story about a trust domain.",
    "You are a helpful assistant. Answer briefly and clearly.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    context: int = 256,
    vocab: int = 400,
    seed: int = 0,
) -> Path:
    """Write a random ``LlamaForCausalLM`` and its tokenizer (BOS/EOS/PAD, chat template) into ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    ids = {t: tok.token_to_id(t) for t in specials}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
