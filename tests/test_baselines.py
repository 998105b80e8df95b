"""The baselines on the same code path: Rho-1, ProFit and DFT."""

import math

import pytest
import torch
from conftest import first_batch, lora_config, randomize_adapter
from trl import SFTTrainer

from trl_sstoken.history.reference import REFERENCE_ADAPTER
from trl_sstoken.selection.scoring import (
    excess_loss,
    num_to_keep,
    probability_weights,
    select_by_probability,
    top_k_per_batch,
)
from trl_sstoken.tiny import build_tiny_model


DETERMINISTIC = dict(lora=lora_config(lora_dropout=0.0))


def test_excess_loss_sign_is_rho1s():
    current, reference = torch.tensor([[-3.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    # L_cur - L_ref: the first token is one the reference knows and the current model does not
    assert excess_loss(current, reference).tolist() == [[2.0, 0.0]]


def test_top_k_per_batch_selects_across_rows():
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    keep = top_k_per_batch(scores, mask, 0.5)
    assert keep.tolist() == [[True, True, True], [False, False, False]]  # a per-row top-k would keep 2 + 2


def test_probability_selection_and_weights():
    logps = torch.log(torch.tensor([[0.5, 0.1, 0.05, 0.9]]))
    mask = torch.tensor([[True, True, True, False]])
    assert select_by_probability(logps, mask, 0.1).tolist() == [[True, True, False, False]]
    torch.testing.assert_close(probability_weights(logps, mask), torch.tensor([[0.5, 0.1, 0.05, 0.0]]))


def test_dft_equals_trls_dft_loss_and_gradients(make_trainer):
    ours = make_trainer(selection_method="dft", **DETERMINISTIC)
    plain = make_trainer(trainer_class=SFTTrainer, loss_type="dft", **DETERMINISTIC)
    randomize_adapter(ours.model)
    randomize_adapter(plain.model)
    batch = first_batch(ours)
    results = []
    for trainer in (ours, plain):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        )
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, msg=name)


def test_profit_keeps_tokens_the_model_already_finds_likely(make_trainer):
    trainer = make_trainer(selection_method="profit", selection_loss_normalization="all")
    randomize_adapter(trainer.model, scale=2.0)
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in trainer._prepare_inputs(dict(batch)).items() if not k.startswith("sstoken_")}
        logps = trainer.model(**inputs, fused_lm_head=True).log_probs
    response = inputs["labels"][:, 1:] != -100
    threshold = float(logps[response].median().exp())  # a threshold that splits this batch
    trainer.args.profit_threshold = threshold
    selection = trainer.preview_selection(batch)
    expected = response & (logps >= math.log(threshold))
    assert torch.equal(selection.keep, expected)
    assert 0 < int(expected.sum()) < int(response.sum())


@pytest.fixture
def reference_adapter_dir(make_trainer, tmp_path):
    """A LoRA adapter trained briefly on the data, saved like a user's reference adapter."""
    trainer = make_trainer(selection_method="full", max_steps=3, output_dir=str(tmp_path / "reference-run"))
    trainer.train()
    trainer.save_model(str(tmp_path / "reference"))
    return str(tmp_path / "reference")


def test_rho1_with_a_reference_adapter(make_trainer, reference_adapter_dir, tmp_path):
    trainer = make_trainer(
        selection_method="rho1",
        reference_adapter=reference_adapter_dir,
        max_steps=2,
        selection_ratio=0.5,
        **DETERMINISTIC,
    )
    named = dict(trainer.model.named_parameters())
    reference = {n: p.detach().clone() for n, p in named.items() if f".{REFERENCE_ADAPTER}." in n}
    assert reference and all(not named[n].requires_grad for n in reference)
    assert all(p.requires_grad for n, p in named.items() if ".default." in n)

    # the selection is the batch-wide top-k of L_cur - L_ref, computed here independently
    batch = first_batch(trainer)
    selection = trainer.preview_selection(batch)
    model = trainer.model
    inputs = {k: v for k, v in trainer._prepare_inputs(dict(batch)).items() if not k.startswith("sstoken_")}
    model.eval()
    with torch.no_grad():
        current = model(**inputs, fused_lm_head=True).log_probs
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        reference_logps = model(**inputs, fused_lm_head=True).log_probs
        model.set_adapter("default")
    response = selection.regions.response
    expected = top_k_per_batch(reference_logps - current, response, 0.5)
    assert torch.equal(selection.keep, expected)
    assert int(selection.keep.sum()) == int(num_to_keep(response.reshape(1, -1), 0.5))

    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(named[n]) for n in reference}
    for name, before in reference.items():
        assert torch.equal(named[name], before), name
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / REFERENCE_ADAPTER).exists()


def test_rho1_with_a_reference_model(make_trainer, tokenizer, tmp_path):
    reference_dir = tmp_path / "reference-model"
    build_tiny_model(tokenizer, seed=5).save_pretrained(reference_dir)
    trainer = make_trainer(selection_method="rho1", reference_model=str(reference_dir), max_steps=2)
    assert all(not p.requires_grad for p in trainer._reference.model.parameters())
    trainer.train()
    assert [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]


def test_rho1_refuses_a_reference_with_another_vocabulary(make_trainer, tokenizer, tmp_path):
    from trl_sstoken.tiny import build_tiny_tokenizer

    other_tokenizer = build_tiny_tokenizer(["completely different words here"])
    reference_dir = tmp_path / "other"
    build_tiny_model(other_tokenizer).save_pretrained(reference_dir)
    with pytest.raises(ValueError, match="vocabulary"):
        make_trainer(selection_method="rho1", reference_model=str(reference_dir))
    # same vocabulary size, different tokens: refused through the tokenizer saved with the reference
    from trl_sstoken.tiny import SPECIAL_TOKENS

    words = sorted(w for w in tokenizer.get_vocab() if w not in SPECIAL_TOKENS)
    words[words.index("cat")] = "zebra"
    other_same_size = build_tiny_tokenizer([" ".join(words)])
    assert len(other_same_size) == len(tokenizer) and other_same_size.get_vocab() != tokenizer.get_vocab()
    same_size = tmp_path / "same-size"
    build_tiny_model(tokenizer).save_pretrained(same_size)
    other_same_size.save_pretrained(same_size)
    with pytest.raises(ValueError, match="tokenizer"):
        make_trainer(selection_method="rho1", reference_model=str(same_size))


@pytest.mark.parametrize("method,extra", [("profit", {"selection_loss_normalization": "all"}), ("dft", {})])
def test_profit_and_dft_train(make_trainer, method, extra):
    trainer = make_trainer(selection_method=method, max_steps=3, **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    if method == "dft":  # every response token carries a (small) gradient: the adapter moves
        assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
