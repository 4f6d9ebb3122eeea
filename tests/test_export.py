"""`nanochat export`: the Hugging Face directory loads in transformers and computes what our model
computes (logits, greedy generation), its tokenizer gives our ids, its chat template our prompt;
inexact mappings and GGUF are refused with their reasons."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat.chat_format import render_for_completion
from nanochat.cli import main as nanochat_main
from nanochat.config import ModelConfig
from nanochat.engine import Engine, Sampling
from nanochat.errors import NanochatError
from nanochat.export.gguf import export_gguf
from nanochat.export.hf import choose_arch, export_hf
from nanochat.export.hf_tokenizer import to_hf_tokenizer
from nanochat.gpt import GPT
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from tests._chat_model import TEXT, make_chat_model

RT = init_runtime(device="cpu", dtype="float32")

SAMPLES = [
    "Hello world! The cat sat on the mat.",
    "def f(x):\n    return x ** 2  # squares\n\n\tindented\r\n  trailing   ",
    "Café, naïve, über — 日本語のテキスト, 한국어, русский текст, العربية",
    "emoji 😀👍🏽🇫🇷 and ZWJ 👩‍👩‍👧 family",
    "numbers 1234567 3.14159 -42 1e10, and 'quotes' they're we'll I'VE",
    "   leading spaces\n\n\nnewlines    \n   ",
    "<|user_start|> typed as text",
    "",
]

# Every part of the recipe switched on, so the remote-code model has all of them to get right.
RECIPE = dict(depth=3, aspect_ratio=32, head_dim=16, sequence_len=64, n_kv_head=1, smear=True, bigram_multiple=4,
              value_embeddings=True, value_embed_every=1, ve_gate=True, x0_skip=True, logit_softcap=15.0)
PLAIN = dict(depth=2, aspect_ratio=32, head_dim=16, sequence_len=64, n_kv_head=1, smear=False, bigram_multiple=0,
             value_embeddings=False, logit_softcap=0.0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT, *SAMPLES * 5], 400)


def trained_looking(shape: dict, vocab: int, seed: int = 0) -> GPT:
    """A model whose every weight matters: fresh init leaves zeros (output projections, gates,
    bigram table) that would hide a wrong mapping, so all are redrawn."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**shape), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.5))
    return model.eval()


def export_and_load(model: GPT, tok: Tokenizer, tmp_path, arch: str = "auto"):
    out = tmp_path / f"export-{arch}"
    used = export_hf(model, tok, out, arch)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=used == "remote", dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(out, trust_remote_code=used == "remote"), used


def test_tokenizer_ids_equal_ours(tok):
    hf = to_hf_tokenizer(tok)
    for text in SAMPLES:
        # a special token's string inside text is that token to transformers, text to encode_ordinary
        # (split_special_tokens=True asks transformers for the same)
        assert hf.encode(text, add_special_tokens=False, split_special_tokens="<|" in text) == \
            tok.encode_ordinary(text), text
        assert hf.decode(tok.encode_ordinary(text)) == text
    specials = "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"
    assert hf.encode(specials, add_special_tokens=False) == tok.encode(specials, allowed_special="all")


def test_chat_template_renders_our_prompt(tok):
    hf = to_hf_tokenizer(tok)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 23 times 17?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute."},
                                          {"type": "python", "text": "23*17"},
                                          {"type": "python_output", "text": "391"},
                                          {"type": "text", "text": "It is 391."}]},
        {"role": "user", "content": "And naïve 日本 😀?"},
        {"role": "assistant", "content": "No idea."},
        {"role": "user", "content": "Thanks!\n"},
    ]
    ids = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render_for_completion(tok, conversation)
    assert hf.apply_chat_template(conversation[1:2], add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == render_for_completion(tok, conversation[1:2])


@pytest.mark.parametrize("shape,arch", [(RECIPE, "remote"), (PLAIN, "qwen3"), ({**PLAIN, "qk_norm": False}, "llama"),
                                        ({**PLAIN, "mlp": "relu2", "logit_softcap": 15.0, "n_kv_head": 2,
                                          "tie_embeddings": True}, "nanochat"),
                                        ({**RECIPE, "tie_embeddings": True, "mlp": "relu2"}, "remote")])
def test_transformers_logits_equal_ours(tok, tmp_path, shape, arch):
    model = trained_looking(shape, tok.vocab_size)
    hf, _, used = export_and_load(model, tok, tmp_path)
    assert used == arch
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.vocab_size, (2, 40), generator=g),
               torch.tensor([tok.encode_ordinary(SAMPLES[0] + " " + SAMPLES[2])[:60]])]
    with torch.no_grad():
        for idx in prompts:
            ours = model(idx)
            theirs = hf(input_ids=idx).logits
            assert theirs.shape == ours.shape
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        # left padding, as batched generation pads: each row's logits are those of the row alone
        short, long = prompts[0][0, :25], prompts[0][1]
        batch = torch.stack([torch.cat([torch.zeros(15, dtype=torch.long), short]), long])
        mask = torch.stack([torch.cat([torch.zeros(15), torch.ones(25)]), torch.ones(40)]).long()
        padded = hf(input_ids=batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0, 15:], model(short[None])[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(padded[1], model(long[None])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [RECIPE, PLAIN, {**PLAIN, "mlp": "relu2", "logit_softcap": 15.0}])
def test_greedy_generation_equals_our_engine(tok, tmp_path, shape):
    model = trained_looking(shape, tok.vocab_size, seed=1)
    hf, hf_tok, _ = export_and_load(model, tok, tmp_path)
    conversation = [{"role": "user", "content": "Tell me about the cat on the mat."}]
    prompt = render_for_completion(tok, conversation)
    assert hf_tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False) == prompt
    ((ours, chosen),) = Engine(model, tok, RT).rollout([prompt], Sampling(max_tokens=64, temperature=0))
    assert all(chosen)  # no calculator call: transformers does not run tools
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=64)
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == 64 and theirs == ours


def test_inexact_architectures_and_gguf_are_refused_with_reasons(tok, tmp_path):
    recipe = trained_looking(RECIPE, tok.vocab_size)
    assert choose_arch(recipe.config, "auto") == "remote"
    with pytest.raises(NanochatError, match="smear.*bigram|bigram.*smear|soft-cap"):
        choose_arch(recipe.config, "qwen3")
    with pytest.raises(NanochatError, match="QK-norm"):
        choose_arch(ModelConfig(**PLAIN), "llama")
    with pytest.raises(NanochatError, match="the architecture.*smear(.|\n)*the tokenizer"):
        export_gguf(recipe, tok, tmp_path / "m.gguf")
    with pytest.raises(NanochatError, match="the tokenizer"):  # a plain model: only the tokenizer stands in the way
        export_gguf(trained_looking(PLAIN, tok.vocab_size), tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(NanochatError, match="not empty"):
        export_hf(recipe, tok, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_export_command_writes_a_loadable_directory_with_a_model_card(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    make_chat_model(run="r", tokenizer="r", stage="sft")
    assert nanochat_main(["export", "--run", "r", "--out", str(tmp_path / "hf")]) == 0
    assert "exported r/sft" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "modeling_nanochat.py",
            "README.md"} <= files
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| sft | 1 |" in card and "trust_remote_code=True" in card
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert hf.generation_config.eos_token_id[0] == AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids(
        "<|assistant_end|>")
    assert nanochat_main(["export", "--run", "r", "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "cannot export this model to GGUF" in capsys.readouterr().err
    assert nanochat_main(["export", "--run", "r", "--arch", "qwen3", "--out", str(tmp_path / "q")]) == 1
    assert "would change this model's outputs" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module", params=["cl100k_base", "o200k_base"])
def official(request) -> tuple[Tokenizer, object]:
    """OpenAI's vocabularies (100k and 200k ranks, their own split patterns) as fast tokenizers."""
    official = Tokenizer.official(request.param)
    n = len(official.mergeable_ranks)
    return official, to_hf_tokenizer(Tokenizer(official.mergeable_ranks, official.pattern, {"<|bos|>": n}))


def test_merges_rebuild_the_official_vocabularies(official):
    # their ranks as BPE merges, their patterns in Oniguruma's syntax: the tokenizers library then
    # encodes exactly as tiktoken does (digit runs of 4+ and 3.14159 catch a wrong repeat)
    ours, hf = official
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == ours.encode_ordinary(text), text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=80))
def test_any_text_gets_our_ids(official, tok, text):
    ours, hf = official
    assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ours.encode_ordinary(text)
    assert to_hf_tokenizer(tok).encode(text, add_special_tokens=False, split_special_tokens=True) == \
        tok.encode_ordinary(text)
