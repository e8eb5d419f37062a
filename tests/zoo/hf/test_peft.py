"""peft LoRA adapters in and out (routezoo.zoo.hf.peft), checked against peft and transformers.

Tiny random transformers models (a Mixtral and a Llama, float32) carry LoRAs that peft
itself builds, with random non-zero factors, and saves. routezoo reads them onto the
imported base and must give the logits of the transformers+peft model on a padded batch;
a routezoo LoRA (a run's adapter directory) exported with ``routezoo convert --to-peft``
must load with ``peft.PeftModel.from_pretrained`` and give routezoo's logits. Bad input
is refused in one line with exit code 2, before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import assert_cli_usage_error, random_adapter  # noqa: E402
from test_hf import _rel_err, _tokens, tiny_causal_lm_factory  # noqa: E402

from routezoo.layers import adapters  # noqa: E402
from routezoo.layers.adapters.base import fingerprint  # noqa: E402
from routezoo.training import adapter_run, cli, config_check  # noqa: E402
from routezoo.zoo import hf, stack  # noqa: E402
from routezoo.zoo.hf import peft as hf_peft  # noqa: E402
from routezoo.zoo.lm import positions_from_mask  # noqa: E402

# vocab 300: at least the byte tokenizer's 258, so a run config on these bases validates
SPECS = {"mixtral": ("MixtralConfig", dict(vocab_size=300, num_local_experts=4, num_experts_per_tok=2)),
         "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
         # bases a Mixtral adapter does not belong to: other widths, fewer layers
         "llama_wide": ("LlamaConfig", dict(vocab_size=300, hidden_size=48, num_attention_heads=6,
                                            num_key_value_heads=3, head_dim=8)),
         "llama_one_layer": ("LlamaConfig", dict(vocab_size=300, num_hidden_layers=1))}
RTOL = 1e-5   # float32; the adapter moves the logits by O(1) (checked), so this is tight


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """name -> (HF directory, torch model) of a tiny random base, saved once."""
    return tiny_causal_lm_factory(tmp_path_factory, SPECS)


def _randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    """Random A and B; DoRA's magnitudes (peft's init: the base's norms) moved by up to ~20%."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def make_peft(torch_base, out: str, seed: int = 1, **lora) -> "peft.PeftModel":
    """peft's own LoRA (DoRA with ``use_dora``) on a copy of ``torch_base`` (random non-zero
    factors), saved to ``out``."""
    model = peft.get_peft_model(copy.deepcopy(torch_base), peft.LoraConfig(**lora))
    _randomize_lora(model, seed)
    model.save_pretrained(out)
    return model.eval()


def _torch_logits(model, tokens, mask) -> np.ndarray:
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _rz_logits(model, params, tokens, mask) -> np.ndarray:
    logits, _ = model.apply({"params": params}, tokens, attention_mask=mask, positions=positions_from_mask(mask))
    return np.asarray(logits)


def _peft_modules(model) -> set[str]:
    """The modules peft put a LoRA layer on (HF module names)."""
    from peft.tuners.lora import LoraLayer
    return {name.removeprefix("base_model.model.") for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer)}


def _merged(base_dir: str, settings: dict, adapter_params) -> tuple:
    """(model, base with the routezoo LoRA of ``settings`` merged in)."""
    model, params = hf.from_hf(base_dir, scan_layers=False)
    method = adapters.from_config(ml_collections.ConfigDict(settings))
    return model, method.merge(params, adapter_params)


# ----------------------------------------------------------------------------- peft -> routezoo


@pytest.mark.parametrize("family,lora", [
    ("mixtral", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("llama", dict(r=2, lora_alpha=5, use_rslora=True,
                   target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])),
    ("llama", dict(r=3, lora_alpha=3, target_modules=["v_proj"], layers_to_transform=[1])),
], ids=["mixtral_attention", "llama_rslora_mlp_head", "llama_one_layer"])
def test_peft_lora_loads_with_peft_logits(family, lora, base, tmp_path):
    base_dir, torch_base = base(family)
    ref = make_peft(torch_base, str(tmp_path / "adapter"), **lora)
    loaded = hf_peft.read(str(tmp_path / "adapter"), base_dir)
    cfg = ref.peft_config["default"]
    assert (loaded.rank, loaded.alpha, loaded.rslora) == (cfg.r, cfg.lora_alpha, cfg.use_rslora)
    assert {m.name for m in loaded.modules} == _peft_modules(ref)

    model, merged = _merged(base_dir, loaded.settings(), hf_peft.read_params(loaded))
    # routezoo's targets select exactly those weights
    assert set(adapters.base.select_targets(merged, loaded.targets)) == {m.path for m in loaded.modules}
    tokens, mask = _tokens()
    want = _torch_logits(ref, tokens, mask)
    assert _rel_err(_torch_logits(torch_base, tokens, mask), want, mask) > 1e-2   # the adapter matters
    assert _rel_err(_rz_logits(model, merged, tokens, mask), want, mask) <= RTOL


# ----------------------------------------------------------------------------- a run: in and back out


def _run_config(wd, base_dir, peft_dir, *extra):
    config, _, _ = cli.parse_train_flags(["--workdir", str(wd), f"--config.init.from_hf={base_dir}",
                                          f"--config.init.from_peft={peft_dir}", *extra])
    hf.update_config_from_hf(config)
    return config, hf_peft.update_config_from_peft(config)


def _write_run(wd, config, adapter_params, base_params) -> None:
    """A LoRA run's workdir as the training loop leaves it: config.json and adapter/."""
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    meta = {"method": str(config.adapter.method), "adapter": adapter_run.adapter_config(config).to_dict(),
            "base_fingerprint": fingerprint(base_params)}
    adapter_run.save_adapter(os.path.join(wd, adapter_run.ADAPTER_DIR), adapter_params, meta, step=1)


def _boxed_values(boxed, params):
    """The boxed abstract tree ``boxed`` holding the values ``params`` (DoRA's init reads them)."""
    return jax.tree.map(lambda b, v: b.replace_boxed(v), boxed, params,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_run_starts_from_peft_and_exports_back_to_peft(dora, base, tmp_path):
    """init.from_peft sets the adapter config and initialises the run's LoRA (or DoRA:
    use_dora, lora_magnitude_vector) with peft's logits; ``convert --to-peft`` of the run
    loads in peft with routezoo's logits and the same r, alpha, rsLoRA, dropout,
    target_modules and use_dora."""
    base_dir, torch_base = base("mixtral")
    peft_dir = str(tmp_path / "adapter")
    ref = make_peft(torch_base, peft_dir, r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05,
                    target_modules=["q_proj", "v_proj", "o_proj"], use_dora=dora)
    cfg = ref.peft_config["default"]
    wd = tmp_path / "run"
    config, changes = _run_config(wd, base_dir, peft_dir)
    a = config.adapter
    assert (a.method, a.rank, a.alpha, a.rslora, a.lora_dropout) == (
        "dora" if cfg.use_dora else "lora", cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout)
    assert any(c.startswith("adapter.targets=") for c in changes)
    config_check.validate(config, num_devices=1, process_count=1)

    # the run's LoRA at step 0: the method's init from the sources the loop reads
    adapter_run.resolve_layout(config, log=lambda *_: None)
    model, base_params = hf.from_hf(base_dir, scan_layers=False)
    method = adapters.from_config(adapter_run.adapter_config(config))
    sources = adapter_run.adapter_sources(config)
    adapter_run.check_sources(sources, fingerprint(base_params))
    boxed = _boxed_values(hf.abstract_params(model), base_params)
    init = nn.unbox(method.init(jax.random.PRNGKey(0), boxed, previous=sources["previous"][0]))
    tokens, mask = _tokens()
    assert _rel_err(_rz_logits(model, method.merge(base_params, init), tokens, mask),
                    _torch_logits(ref, tokens, mask), mask) <= RTOL

    # a trained adapter (moved away from peft's), written as the loop does, exported
    rng = np.random.default_rng(7)
    trained = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), init)
    _write_run(str(wd), config, trained, base_params)
    out = str(tmp_path / "exported")
    assert cli.main(["convert", "--workdir", str(wd), "--to-peft", out]) == 0
    written = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (written["peft_type"], written["r"], written["lora_alpha"], written["use_rslora"], written["lora_dropout"],
            written["use_dora"]) == ("LORA", cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout, cfg.use_dora)
    assert sorted(written["target_modules"]) == sorted(cfg.target_modules)
    assert written["base_model_name_or_path"] == base_dir
    back = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), out).eval()
    assert _peft_modules(back) == _peft_modules(ref)
    assert _rel_err(_rz_logits(model, method.merge(base_params, trained), tokens, mask),
                    _torch_logits(back, tokens, mask), mask) <= RTOL


def test_export_of_routezoo_targets_any_layout(base, tmp_path):
    """A LoRA on targets chosen in routezoo (MLP, attention output, the output head) with
    rsLoRA: the same files from the scanned and the unscanned config; peft loads them
    with routezoo's logits; reading them back gives the same parameters bit for bit."""
    base_dir, torch_base = base("llama")
    model, base_params = hf.from_hf(base_dir, scan_layers=False)
    settings = dict(method="lora", targets="attn/(q|o)|mlp/(wi|wo)|unembed", rank=3, alpha=4.0, rslora=True,
                    lora_dropout=0.0)
    method = adapters.from_config(ml_collections.ConfigDict(settings))
    params = random_adapter(method, hf.abstract_params(model), scale=0.1)
    outs = {}
    for scanned in (False, True):
        outs[scanned] = str(tmp_path / f"scanned_{scanned}")
        hf_peft.to_peft(stack.with_scan(model.cfg, scanned), settings, params, outs[scanned], base=base_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert open(os.path.join(outs[False], name), "rb").read() == open(os.path.join(outs[True], name), "rb").read()

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), outs[False]).eval()
    cfg = loaded.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (3, 4.0, True)
    tokens, mask = _tokens()
    assert _rel_err(_rz_logits(model, method.merge(base_params, params), tokens, mask),
                    _torch_logits(loaded, tokens, mask), mask) <= RTOL

    again = hf_peft.read(outs[False], base_dir)
    assert set(adapters.base.select_targets(base_params, again.targets)) == \
        set(adapters.base.select_targets(base_params, settings["targets"]))
    for (p1, x), (p2, y) in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree_util.tree_leaves_with_path(hf_peft.read_params(again))):
        assert p1 == p2 and np.array_equal(x, y), p1


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_peft(base, tmp_path_factory):
    """A peft LoRA (q, v) on the tiny Mixtral: (base dir, adapter dir)."""
    base_dir, torch_base = base("mixtral")
    out = str(tmp_path_factory.mktemp("good_peft"))
    make_peft(torch_base, out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base_dir, out


def _edit_config(**changes):
    def edit(d):
        path = os.path.join(d, "adapter_config.json")
        cfg = json.load(open(path))
        cfg.update(changes)
        json.dump(cfg, open(path, "w"))
    return edit


def _add_tensor(name):
    def edit(d):
        from safetensors.numpy import load_file, save_file
        path = os.path.join(d, "adapter_model.safetensors")
        tensors = load_file(path)
        tensors[name] = np.zeros((4, 300), np.float32)
        save_file(tensors, path)
    return edit


def _truncate(d):
    path = os.path.join(d, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _bin_only(d):
    os.rename(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin"))


BAD_DIRS = {
    "no_config": (lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json not found"),
    "config_not_json": (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write("{r: 4"),
                        "is not valid JSON"),
    "bin_only": (_bin_only, "only safetensors is read"),
    "truncated": (_truncate, "not a readable safetensors file"),
    "unknown_target": (_edit_config(target_modules=["q_proj", "foo_proj"]), "unknown target module 'foo_proj'"),
    "router_target": (_edit_config(target_modules=["gate"]), "MoE router"),
    "not_lora": (_edit_config(peft_type="IA3"), "allowed: 'LORA'"),
    "rank_pattern": (_edit_config(rank_pattern={"q_proj": 8}), "rank_pattern"),
    "dora_without_magnitudes": (_edit_config(use_dora=True), "lora_magnitude_vector is missing"),
    "not_a_lora_tensor": (_add_tensor("base_model.model.model.embed_tokens.lora_embedding_A"),
                          "is not a LoRA factor of a Linear module"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRS))
def test_bad_peft_directory_is_refused_in_one_line(case, good_peft, tmp_path, capsys):
    base_dir, good = good_peft
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    edit, needle = BAD_DIRS[case]
    edit(bad)
    assert_cli_usage_error(tmp_path, capsys, [f"--config.init.from_hf={base_dir}", f"--config.init.from_peft={bad}"],
                           needle)
    if case == "unknown_target":   # the allowed values are named
        with pytest.raises(hf.HFError, match=r"allowed: k_proj, lm_head, o_proj, q_proj, v_proj$"):
            hf_peft.read(bad, base_dir)


@pytest.mark.parametrize("other,needle", [
    ("llama_wide", "needs [4, 48]: the adapter belongs to another base"),
    ("llama_one_layer", "adapts module 'model.layers.1.self_attn.q_proj', which the base"),
], ids=["shape", "name"])
def test_peft_adapter_of_another_base_is_refused(other, needle, base, good_peft, tmp_path, capsys):
    _, adapter = good_peft
    other_dir = base(other)[0]
    capsys.readouterr()
    assert_cli_usage_error(tmp_path, capsys, [f"--config.init.from_hf={other_dir}",
                                              f"--config.init.from_peft={adapter}"], needle)


def test_run_settings_that_contradict_the_peft_adapter(good_peft, tmp_path, capsys):
    base_dir, adapter = good_peft
    assert_cli_usage_error(tmp_path, capsys, [f"--config.init.from_peft={adapter}"], "needs init.from_hf")
    assert_cli_usage_error(tmp_path, capsys, [f"--config.init.from_hf={base_dir}", f"--config.init.from_peft={adapter}",
                                              "--config.adapter.method=mos"], "allowed: 'lora'")
    # a config built in code (no CLI to set it from the directory) must agree with the adapter
    config, _ = _run_config(tmp_path / "wd", base_dir, adapter)
    config.adapter.rank = 8
    with pytest.raises(config_check.ConfigError, match=r"adapter.rank=8 \(r=4\)") as e:
        config_check.validate(config, num_devices=1, process_count=1)
    assert "\n" not in str(e.value)


def _fake_run(wd, base_dir, **adapter) -> None:
    """A workdir of a run on the base ``base_dir`` with ``adapter`` settings: config.json, and
    adapter/ with random factors for a LoRA (the export of other methods stops at the config)."""
    from routezoo.configs import base as base_config
    config = base_config.get_config()
    config.init.from_hf = base_dir
    hf.update_config_from_hf(config)
    config.model.scan_layers = False
    for key, value in adapter.items():
        config.adapter[key] = value
    if config.adapter.method == "lora":
        model, base_params = hf.from_hf(base_dir, scan_layers=False)
        method = adapters.from_config(config.adapter)
        params = random_adapter(method, hf.abstract_params(model))
        _write_run(wd, config, params, base_params)
    else:
        os.makedirs(wd)
        with open(os.path.join(wd, "config.json"), "w") as f:
            f.write(config.to_json_best_effort())


@pytest.mark.parametrize("adapter,needle", [
    (dict(method=""), "is not an adapter run"),
    (dict(method="mos", targets="attn/q"), "has no peft form; allowed: lora"),
    (dict(method="lora", targets="attn/q|experts/wi"), "stacked experts"),
    (dict(method="lora", targets="router/kernel"), "MoE router"),
], ids=["no_adapter", "mos", "experts", "router"])
def test_export_refusals_write_nothing(adapter, needle, base, tmp_path, capsys):
    base_dir, _ = base("mixtral")
    wd, out = str(tmp_path / "run"), str(tmp_path / "out")
    _fake_run(wd, base_dir, **adapter)
    capsys.readouterr()
    assert cli.main(["convert", "--workdir", wd, "--to-peft", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(out)
