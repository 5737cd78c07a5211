"""Llama export: identical logits to the GPT prior, greedy generate agrees, unsupported priors refused."""

import pytest
import torch

from prior import GPT, GPTConfig
from prior.hf_export import export_to_llama, llama_input_ids

V, GRID = 16, [3, 3]


def make(cond="class", rope="1d"):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, grid=GRID, cond=cond, num_classes=4, rope=rope)).eval()


@pytest.mark.parametrize("cond", ["class", "none"])
def test_exported_llama_has_identical_logits(tmp_path, cond):
    from transformers import LlamaForCausalLM

    model = make(cond)
    export_to_llama(model, tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    codes = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    class_ids = torch.tensor([0, 3, 4]) if cond == "class" else None
    c = model.condition(class_ids=class_ids) if cond == "class" else model.null_condition(3)
    ids = llama_input_ids(codes, class_ids, V)
    assert ids.shape == (3, 10)
    with torch.no_grad():
        theirs = llama(ids).logits[:, :9, :V]
        ours = model(codes, c)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    prefix_ids = list(range(V, llama.config.vocab_size))
    assert llama.generation_config.suppress_tokens == prefix_ids


def test_greedy_generate_matches_cached_greedy(tmp_path):
    from transformers import LlamaForCausalLM

    model = make("class")
    export_to_llama(model, tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    class_ids = torch.tensor([1, 2])
    with torch.no_grad():
        out = llama.generate(
            llama_input_ids(torch.zeros(2, 0, dtype=torch.long), class_ids, V),
            max_new_tokens=9,
            do_sample=False,
        )
        model.setup_caches(2, 9)
        logits = model.prefill(model.condition(class_ids=class_ids))
        tokens = []
        for i in range(9):
            tok = logits.argmax(-1)
            tokens.append(tok)
            if i < 8:
                logits = model.decode(tok[:, None], torch.full((2,), i))[:, 0]
    assert torch.equal(out[:, 1:], torch.stack(tokens, 1))


def test_unsupported_priors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="1D-RoPE"):
        export_to_llama(make(rope="2d"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="class_ids"):
        llama_input_ids(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1]), V)
    text = GPTConfig(vocab_size=V, grid=GRID, cond="text", rope="1d")
    text.text.vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red"]
    with pytest.raises(ValueError, match="text-conditional"):
        export_to_llama(GPT(text), tmp_path / "b")


def test_export_llama_cli(tmp_path):
    from transformers import LlamaForCausalLM

    from scripts.export_llama import main

    gpt = make()
    gpt.save_pretrained(tmp_path / "prior")
    out = main(["--prior", str(tmp_path / "prior"), "--out", str(tmp_path / "llama")])
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    codes = torch.randint(0, V, (2, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(0))
    ids = llama_input_ids(codes, torch.tensor([1, 2]), V)
    cond = gpt.condition(class_ids=torch.tensor([1, 2]))
    torch.testing.assert_close(
        llama(ids).logits[:, :-1, :V], gpt(codes, cond), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(FileExistsError):
        main(["--prior", str(tmp_path / "prior"), "--out", str(tmp_path / "llama")])
