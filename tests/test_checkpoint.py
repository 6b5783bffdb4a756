"""Sharded checkpoints (torch.distributed.checkpoint) and the Hugging Face export, on a tiny GPT-2.

Three spawns of gloo ranks serve every test (module-scoped fixture; each spawn costs
seconds of imports):

* world 2 and world 4: train 3 AdamW steps, ``save``, ``export_hf`` (world 2), take one
  more step; world 4 also loads world 2's checkpoint into a fresh module (2 -> 4);
* world 2 again, fresh processes: resume world 2's checkpoint (exact), load world 4's
  (4 -> 2, resharding lm_head's padded vocab and c_attn's chunks), and try bad checkpoints
  (another model's, one with a shard file missing, one truncated, one only rank 0 can
  read): a clear error on every rank, never a hang.

Error paths and world size 1 (no process group) run in this process.

GPT-2 exercises every stored form: ``R`` (LayerNorms), ``S(d)`` (c_fc, c_proj), padded
``S(0)`` (vocab 99 over 2 and 4 ranks) and ``S(d, chunks=3)`` (c_attn), and a tied weight.
"""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from distributed import run_ranks

STEPS = 3


def _gpt2(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=99,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **overrides}))


def _ids() -> torch.Tensor:
    return torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(1))  # (batch, seq)


def _quiet():
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()


def _shard(model, world):
    import autotp

    ids = _ids()
    return autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"labels": ids, "use_cache": False})


def _step(sharded, opt) -> float:
    ids = _ids()
    opt.zero_grad()
    loss = sharded(ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    return loss.item()


def _fresh(world, seed=123, **overrides):
    """A sharded model with other weights and a new optimizer: everything must come from the checkpoint."""
    sharded = _shard(_gpt2(seed, **overrides), world)
    return sharded, torch.optim.AdamW(sharded.parameters(), lr=1e-3)


def _train_and_save(rank, world, root):
    _quiet()
    import autotp.checkpoint as ckpt

    model = _gpt2()
    sharded = _shard(model, world)
    out = {}
    # the gathered tensors are the unsharded model's, exactly (padding stripped, chunks in place)
    gathered = ckpt.full_state_dict(sharded)
    ref = model.state_dict()
    out["gather_mismatch"] = [k for k in gathered if not torch.equal(gathered[k], ref[k])]

    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    out["losses"] = [_step(sharded, opt) for _ in range(STEPS)]
    ckpt.save(os.path.join(root, f"w{world}"), sharded, opt, step=STEPS, extra={"data_pos": 48})
    out["saved"] = ckpt.full_state_dict(sharded)
    if world == 2:
        ckpt.export_hf(sharded, model, os.path.join(root, "hf"))
        with torch.no_grad():
            ids = _ids()
            out["logits"] = sharded(ids, labels=ids, use_cache=False).logits
    out["next_loss"] = _step(sharded, opt)
    out["next"] = ckpt.full_state_dict(sharded)

    if world == 4:  # 2 -> 4: more ranks than saved shards, lm_head padded differently
        other, other_opt = _fresh(world)
        ckpt.load(os.path.join(root, "w2"), other, other_opt)
        out["loaded_w2"] = ckpt.full_state_dict(other)
        out["loaded_w2_next_loss"] = _step(other, other_opt)
    return out if rank == 0 else None


def _resume(rank, world, root):
    _quiet()
    import torch.distributed as dist

    import autotp.checkpoint as ckpt

    out = {}
    # (a) same world size: the identical next step
    sharded, opt = _fresh(world)
    out["info_w2"] = ckpt.load(os.path.join(root, "w2"), sharded, opt)
    out["loaded_w2"] = ckpt.full_state_dict(sharded)
    out["w2_next_loss"] = _step(sharded, opt)
    out["w2_next"] = ckpt.full_state_dict(sharded)

    # (b) 4 -> 2
    sharded, opt = _fresh(world)
    out["info_w4"] = ckpt.load(os.path.join(root, "w4"), sharded, opt)
    out["loaded_w4"] = ckpt.full_state_dict(sharded)
    out["w4_next_loss"] = _step(sharded, opt)
    out["w4_next"] = ckpt.full_state_dict(sharded)

    # (c) bad checkpoints: a clear error on every rank, before any tensor is read (no hang)
    errors = {}
    errors["wider"] = _error(lambda: ckpt.load(os.path.join(root, "w2"), *_fresh(world, n_embd=32)))
    if rank == 0:
        shutil.copytree(os.path.join(root, "w2"), os.path.join(root, "w2_missing"))
        os.remove(os.path.join(root, "w2_missing", "__1_0.distcp"))
        shutil.copytree(os.path.join(root, "w2"), os.path.join(root, "w2_truncated"))
        with open(os.path.join(root, "w2_truncated", "__0_0.distcp"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    dist.barrier()
    errors["missing"] = _error(lambda: ckpt.load(os.path.join(root, "w2_missing"), sharded, opt))
    errors["truncated"] = _error(lambda: ckpt.load(os.path.join(root, "w2_truncated"), sharded, opt))
    # a checkpoint that only some ranks can read (rank 1 is given another path, as with a node-local disk)
    errors["one_rank"] = _error(lambda: ckpt.load(os.path.join(root, "w2" if rank == 0 else "w2_elsewhere"),
                                                  sharded, opt))
    out["errors"] = errors
    return out if rank == 0 else {"errors": errors}


def _error(fn) -> str:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    w2 = run_ranks(_train_and_save, 2, root)[0]
    w4 = run_ranks(_train_and_save, 4, root)[0]
    resumed, resumed_1 = run_ranks(_resume, 2, root)
    return {"root": root, "w2": w2, "w4": w4, "resumed": resumed, "errors": [resumed["errors"], resumed_1["errors"]]}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_full_state_dict_is_the_unsharded_state_dict(runs):
    assert runs["w2"]["gather_mismatch"] == []
    assert runs["w4"]["gather_mismatch"] == []
    assert "lm_head.weight" in runs["w2"]["saved"] and runs["w2"]["saved"]["lm_head.weight"].shape == (99, 64)


def test_resume_at_same_world_size_is_exact(runs):
    w2, r = runs["w2"], runs["resumed"]
    assert r["info_w2"] == {"step": STEPS, "extra": {"data_pos": 48}, "world_size": 2}
    assert _equal(r["loaded_w2"], w2["saved"]) == []
    assert r["w2_next_loss"] == w2["next_loss"]  # bit-identical: same shards, same optimizer state
    assert _equal(r["w2_next"], w2["next"]) == []


def test_load_world_4_checkpoint_at_world_2(runs):
    w4, r = runs["w4"], runs["resumed"]
    assert r["info_w4"]["world_size"] == 4
    assert _equal(r["loaded_w4"], w4["saved"]) == []  # resharding moves bytes, changes none
    # the next step runs at another world size (other reduction order): equal up to rounding,
    # and the optimizer state came along (a reset AdamW would take a much larger step)
    assert abs(r["w4_next_loss"] - w4["next_loss"]) < 1e-5
    assert _max_diff(r["w4_next"], w4["next"]) < 1e-5


def test_load_world_2_checkpoint_at_world_4(runs):
    w2, w4 = runs["w2"], runs["w4"]
    assert _equal(w4["loaded_w2"], w2["saved"]) == []
    assert abs(w4["loaded_w2_next_loss"] - w2["next_loss"]) < 1e-5


def test_world_sizes_train_alike(runs):
    # sanity for the comparisons above: the same 3 steps at world 2 and 4 give the same model
    assert max(abs(a - b) for a, b in zip(runs["w2"]["losses"], runs["w4"]["losses"])) < 1e-5
    assert _max_diff(runs["w2"]["saved"], runs["w4"]["saved"]) < 1e-4  # Adam amplifies rounding in tiny grads


def test_checkpoint_of_another_model_is_a_clear_error_at_world_2(runs):
    for e in runs["errors"]:  # every rank raises it, before reading a tensor
        assert e["wider"] == ("ValueError: checkpoint at " + repr(os.path.join(runs["root"], "w2")) +
                              " was saved from a different model: parameter 'transformer.wpe.weight' has global "
                              "shape [64, 64] there, [64, 32] here"), e["wider"]


def test_missing_shard_file_is_a_clear_error_at_world_2(runs):
    path = os.path.join(runs["root"], "w2_missing")
    for e in runs["errors"]:
        assert e["missing"] == (
            f"FileNotFoundError: checkpoint at {path!r} is incomplete: shard file '__1_0.distcp' is missing (the save "
            "at world size 2 wrote 2 files: '__0_0.distcp', '__1_0.distcp'); copy the whole checkpoint directory "
            "(every .distcp file and autotp.json), or load an earlier checkpoint"), e["missing"]


def test_truncated_shard_file_is_a_clear_error_at_world_2(runs):
    for e in runs["errors"]:
        assert e["truncated"].startswith("ValueError: checkpoint at "), e["truncated"]
        assert "is truncated: shard file '__0_0.distcp' has " in e["truncated"]


def test_a_rank_that_cannot_read_the_checkpoint_stops_every_rank(runs):
    rank0, rank1 = (e["one_rank"] for e in runs["errors"])
    elsewhere = os.path.join(runs["root"], "w2_elsewhere")
    assert rank1.startswith(f"FileNotFoundError: no checkpoint at {elsewhere!r}"), rank1
    assert rank0 == (f"RuntimeError: checkpoint at {os.path.join(runs['root'], 'w2')!r} cannot be loaded: rank(s) "
                     "[1] of the TP group failed to read it (their errors say why)"), rank0


def test_export_hf_loads_with_from_pretrained(runs):
    _quiet()
    from transformers import AutoModelForCausalLM

    path = os.path.join(runs["root"], "hf")
    assert os.path.exists(os.path.join(path, "config.json"))
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    saved = runs["w2"]["saved"]
    assert torch.equal(model.transformer.wte.weight, saved["lm_head.weight"])
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, saved["transformer.h.0.attn.c_attn.weight"])
    with torch.no_grad():
        logits = model(_ids()).logits
    # the sharded module's own logits at world 2, from its local slices
    assert (logits - runs["w2"]["logits"]).abs().max().item() < 1e-5
    # and an unsharded GPT-2 trained the same 3 steps
    ref = _gpt2()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(STEPS):
        ids = _ids()
        opt.zero_grad()
        ref(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    with torch.no_grad():
        assert (logits - ref(_ids()).logits).abs().max().item() < 1e-4


# Single process (world size 1, no process group): the same files, read and written without ranks.
# The checks made before any tensor is read do not depend on the world size.


def test_checkpoint_of_another_model_is_a_clear_error(runs):
    _quiet()
    import autotp.checkpoint as ckpt

    path = os.path.join(runs["root"], "w2")
    wider, opt = _fresh(1, n_embd=32)
    expected = (r"w2' was saved from a different model: "
                r"parameter 'transformer.wpe.weight' has global shape \[64, 64\] there, \[64, 32\] here")
    with pytest.raises(ValueError, match=expected):
        ckpt.load(path, wider, opt)
    deeper, opt = _fresh(1, n_layer=3)
    with pytest.raises(ValueError, match=r"different model: parameter\(s\) 'transformer.h.2.ln_1.weight', .* "
                                         r"of this model are not in it"):
        ckpt.load(path, deeper, opt)


def test_world_1_loads_and_saves(runs, tmp_path):
    _quiet()
    import autotp.checkpoint as ckpt

    sharded, opt = _fresh(1)
    info = ckpt.load(os.path.join(runs["root"], "w2"), sharded, opt)
    assert info["world_size"] == 2
    assert _equal(ckpt.full_state_dict(sharded), runs["w2"]["saved"]) == []
    assert _step(sharded, opt) == pytest.approx(runs["w2"]["next_loss"], abs=1e-5)

    ckpt.save(tmp_path / "w1", sharded, step=STEPS + 1)
    again, _ = _fresh(1)
    assert ckpt.load(tmp_path / "w1", again)["step"] == STEPS + 1
    assert _equal(ckpt.full_state_dict(again), ckpt.full_state_dict(sharded)) == []


def test_placement_that_differs_between_saving_and_loading(runs, tmp_path):
    # A parameter may be sharded at one world size and replicated at another (heads not divisible
    # by 4); its stored form then differs and load reads it whole and cuts its slice.  At world
    # size 1 every local tensor is the global one, so the plan may say R for c_attn and stay true.
    _quiet()
    import autotp.checkpoint as ckpt
    from autotp.placements import Replicate

    replicated, opt = _fresh(1)
    for name, p in replicated.plan.parameters.items():
        if ".c_attn." in name:
            assert repr(p.placement).endswith("chunks=3)")
            p.placement = Replicate()
    ckpt.load(os.path.join(runs["root"], "w2"), replicated, opt)  # stored (64, 3, 64), loaded as (64, 192)
    assert _equal(ckpt.full_state_dict(replicated), runs["w2"]["saved"]) == []
    ckpt.save(tmp_path / "r", replicated, opt)
    chunked, chunked_opt = _fresh(1)  # stored (64, 192), loaded as S(1, chunks=3)
    ckpt.load(tmp_path / "r", chunked, chunked_opt)
    assert _equal(ckpt.full_state_dict(chunked), runs["w2"]["saved"]) == []
    assert _step(chunked, chunked_opt) == _step(replicated, opt)


def _mqa(world):
    """Falcon with one KV head (``test_arch_classes``): its fused attention weight is held in pieces,
    the q rows sharded and the k, v rows whole (``S(0, pieces=64S+16R+16R)``)."""
    import autotp
    from test_arch_classes import VOCAB, _build

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    model = _build("multi_query")
    return model, autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False}), ids


def _pieced_save(rank, world, root):
    _quiet()
    import autotp.checkpoint as ckpt

    model, sharded, ids = _mqa(world)
    whole = ckpt.full_state_dict(sharded)
    own = dict(model.named_parameters(remove_duplicate=False))  # (the plan also holds export's lifted constants)
    mismatch = [n for n, t in whole.items() if n in own and not torch.equal(t, own[n])]
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    sharded(ids, use_cache=False).logits.square().mean().backward()
    opt.step()
    ckpt.save(os.path.join(root, "mqa"), sharded, opt)
    return {"pieced": sorted(n for n, p in sharded.plan.parameters.items() if getattr(p.placement, "pieces", ())),
            "gather_mismatch": mismatch, "saved": ckpt.full_state_dict(sharded)}


def _pieced_load(rank, world, root):
    _quiet()
    import autotp.checkpoint as ckpt

    _, sharded, _ = _mqa(world)
    with torch.no_grad():
        for p in sharded.parameters():
            p.add_(1.0)  # other weights: everything must come from the checkpoint
    ckpt.load(os.path.join(root, "mqa"), sharded, torch.optim.AdamW(sharded.parameters(), lr=1e-3))
    return ckpt.full_state_dict(sharded)


def test_weight_held_in_pieces_saves_and_loads_at_another_world_size(tmp_path):
    saved = run_ranks(_pieced_save, 2, str(tmp_path))[0]
    assert saved["pieced"] == [f"transformer.h.{i}.self_attention.query_key_value.{k}"
                               for i in range(2) for k in ("bias", "weight")]
    assert saved["gather_mismatch"] == []  # gathered whole: the unsharded model's tensors
    loaded = run_ranks(_pieced_load, 4, str(tmp_path))
    for rank, got in enumerate(loaded):
        assert _equal(got, saved["saved"]) == [], rank


def test_bad_paths_and_missing_optimizer_state(tmp_path):
    _quiet()
    import torch.distributed.checkpoint as dcp

    import autotp.checkpoint as ckpt

    sharded, opt = _fresh(1)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load(tmp_path / "nothing", sharded)
    dcp.save({"weight": torch.zeros(3)}, checkpoint_id=tmp_path / "foreign", no_dist=True)
    with pytest.raises(ValueError, match="without autotp's 'autotp' entry"):
        ckpt.load(tmp_path / "foreign", sharded)
    ckpt.save(tmp_path / "no_opt", sharded)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        ckpt.load(tmp_path / "no_opt", sharded, opt)
    ckpt.save(tmp_path / "sgd", sharded, torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="holds the state of a SGD, not of a AdamW"):
        ckpt.load(tmp_path / "sgd", sharded, opt)


def test_extra_must_be_json_data(tmp_path):
    _quiet()
    import autotp.checkpoint as ckpt

    sharded, opt = _fresh(1)
    _step(sharded, opt)
    bad = [({"betas": (0.9, 0.99)}, r"^extra\['betas'\] is a tuple, which autotp.checkpoint cannot store: it must be "
                                    r"JSON data .*; a tuple would come back as a list: pass a list$"),
           ({"sched": {1: 0.5}}, r"^extra\['sched'\] has the key 1 \(int\); JSON keys are strings, so it would come "
                                 r"back as \"1\": use str keys$"),
           ([{"rng": torch.get_rng_state()}], r"^extra\[0\]\['rng'\] is a torch.Tensor, which autotp.checkpoint "
                                              r"cannot store: it must be JSON data")]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            ckpt.save(tmp_path / "bad", sharded, opt, extra=extra)
    with pytest.raises(ValueError, match=r"step must be an int or None, got 1.5"):
        ckpt.save(tmp_path / "bad", sharded, step=1.5)
    assert not (tmp_path / "bad").exists()  # refused before anything is written

    extra = {"pos": [1, 2.5, None, True, "s", float("inf")], "nested": {"a": {"b": []}}}
    ckpt.save(tmp_path / "ok", sharded, opt, step=2, extra=extra)
    again, again_opt = _fresh(1)
    assert ckpt.load(tmp_path / "ok", again, again_opt) == {"step": 2, "extra": extra, "world_size": 1}
    # the optimizer's hyperparameters come back as they were (AdamW's betas a tuple, not a list)
    assert again_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert type(again_opt.param_groups[0]["betas"]) is tuple


def test_newer_or_damaged_metadata_is_a_clear_error(tmp_path):
    _quiet()
    import json

    import autotp.checkpoint as ckpt

    sharded, _ = _fresh(1)
    ckpt.save(tmp_path / "c", sharded)
    assert sorted(os.listdir(tmp_path / "c")) == [".metadata", "__0_0.distcp", "autotp.json"]
    index = tmp_path / "c" / "autotp.json"
    doc = json.loads(index.read_text())
    assert doc["format"] == ckpt.FORMAT == 2
    index.write_text(json.dumps({**doc, "format": 3, "autotp_version": "9.0"}))
    with pytest.raises(ValueError, match=r"has format 3 \(autotp 9.0\); this autotp \(.*\) reads format 2: upgrade autotp"):
        ckpt.load(tmp_path / "c", sharded)
    index.write_text(json.dumps(doc)[:-10])
    with pytest.raises(ValueError, match=r"autotp.json is not valid JSON .*the save that wrote it did not finish"):
        ckpt.load(tmp_path / "c", sharded)
    del doc["dcp"]["tensors"]["model.lm_head.weight"]
    index.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"autotp.json is corrupt: a storage entry names 'model.lm_head.weight', "
                                         r"which is not among its tensors"):
        ckpt.load(tmp_path / "c", sharded)
