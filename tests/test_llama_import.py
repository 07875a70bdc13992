"""AR initialisation: Llama/Mistral HF folders import as the causal llada_jax model whose logits are
an independent NumPy forward of the HF Llama architecture; bad folders give one-line errors; the
converted workdir may be trained as an MDM (causal and objective change on resume), and
train.init_from starts an MDM run from the folder itself (another model is refused). The folders'
tokenizers: tests/test_llama_tokenizer.py."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from llada_jax.checkpoint import architecture_mismatch
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop.llama import load_llama
from llada_jax.model import logits

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 97, 48, 2, 6, 2, 80


def llama_config_json(tied: bool, **changes) -> dict:
  """config.json as transformers' LlamaConfig writes it (Llama-2/TinyLlama field set)."""
  hf = {
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": False,
      "attention_dropout": 0.0,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "hidden_act": "silu",
      "hidden_size": HIDDEN,
      "initializer_range": 0.02,
      "intermediate_size": FFN,
      "max_position_embeddings": 64,
      "mlp_bias": False,
      "model_type": "llama",
      "num_attention_heads": HEADS,
      "num_hidden_layers": LAYERS,
      "num_key_value_heads": KV_HEADS,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": None,
      "rope_theta": 500.0,
      "tie_word_embeddings": tied,
      "torch_dtype": "float32",
      "transformers_version": "4.46.3",
      "use_cache": True,
      "vocab_size": VOCAB,
  }
  hf.update(changes)
  return hf


def llama_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under the HF Llama names, PyTorch Linear layout [out_features, in_features]."""
  hd = HIDDEN // HEADS
  shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
  if not tied:
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
  for i in range(LAYERS):
    b = f"model.layers.{i}."
    shapes.update(
        {
            b + "input_layernorm.weight": (HIDDEN,),
            b + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
            b + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
            b + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN),
            b + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
            b + "post_attention_layernorm.weight": (HIDDEN,),
            b + "mlp.gate_proj.weight": (FFN, HIDDEN),
            b + "mlp.up_proj.weight": (FFN, HIDDEN),
            b + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    )
  rng = np.random.RandomState(seed)
  return {
      name: (1.0 + 0.1 * rng.randn(*s) if len(s) == 1 else 0.3 * rng.randn(*s)).astype(np.float32)
      for name, s in shapes.items()
  }


def write_llama(path, hf: dict, tensors: dict, shards: int = 1):
  """The folder save_pretrained writes: config.json and model.safetensors, or shards + index."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  if shards == 1:
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    return path
  names, weight_map = sorted(tensors), {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[i::shards]}
    safetensors.numpy.save_file(part, str(path / file), {"format": "pt"})
    weight_map.update({n: file for n in part})
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
  )
  return path


SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "hello world, this is a tiny llama",
    "who are you? i am a model of text",
]
# Llama-2's first ids (<unk> 0, <s> 1, </s> 2: config.json's bos/eos), then Llama 3's chat tokens.
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write_tokenizer(path, vocab_size: int = 80, chat: bool = True):
  """A Llama-2-like (Metaspace BPE) tokenizer.json of about `vocab_size` tokens trained on
  SENTENCES, with Llama 3's chat tokens if `chat`; returns the file."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tokenizer.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=LLAMA_SPECIALS + (CHAT_SPECIALS if chat else []),
      limit_alphabet=64,
  )
  tokenizer.train_from_iterator(SENTENCES * 4, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(path / "tokenizer.json"))
  return path / "tokenizer.json"


def numpy_llama(tensors: dict, hf: dict, ids: np.ndarray) -> np.ndarray:
  """float64 logits [T, vocab] of LlamaForCausalLM (transformers' modeling_llama, eager path)."""
  w = {n: t.astype(np.float64) for n, t in tensors.items()}
  n_heads, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  hd, eps, t = hf["hidden_size"] // n_heads, hf["rms_norm_eps"], len(ids)

  def rms_norm(x, weight):  # LlamaRMSNorm
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

  # LlamaRotaryEmbedding: inv_freq = 1 / theta^(arange(0, hd, 2) / hd), emb = cat(freqs, freqs).
  inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  emb = np.concatenate([np.outer(np.arange(t), inv_freq)] * 2, axis=-1)  # [T, hd]
  cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

  def rotate_half(x):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate((-x2, x1), axis=-1)

  def linear(x, name):  # nn.Linear without bias: x @ W^T
    return x @ w[name].T

  x = w["model.embed_tokens.weight"][ids]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms_norm(x, w[p + "input_layernorm.weight"])
    q = linear(h, p + "self_attn.q_proj.weight").reshape(t, n_heads, hd)
    k = linear(h, p + "self_attn.k_proj.weight").reshape(t, n_kv, hd)
    v = linear(h, p + "self_attn.v_proj.weight").reshape(t, n_kv, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    # repeat_kv: key/value head j serves query heads j * n_rep ... (j + 1) * n_rep - 1.
    k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, n_heads * hd)
    x = x + linear(attn, p + "self_attn.o_proj.weight")
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
    gate = linear(h, p + "mlp.gate_proj.weight")
    x = x + linear(gate / (1.0 + np.exp(-gate)) * linear(h, p + "mlp.up_proj.weight"),
                   p + "mlp.down_proj.weight")  # fmt: skip
  x = rms_norm(x, w["model.norm.weight"])
  head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
  return x @ head.T


IDS = np.array([1, 5, 17, 96, 3, 3, 42, 0, 77, 12, 64, 2, 9, 31, 50, 88, 4, 23, 61, 7])


@pytest.mark.parametrize(
    "tied,mask_id,shards,scan_layers",
    [(False, None, 1, True), (True, None, 2, True), (False, 0, 1, False), (True, 3, 1, True)],
)
def test_imported_causal_model_is_the_numpy_llama_forward(
    tmp_path, tied, mask_id, shards, scan_layers
):
  hf, tensors = llama_config_json(tied), llama_tensors(tied)
  stored = dict(tensors)
  if tied and mask_id is not None:  # a stored copy of a tied head is skipped, as HF's loader does
    stored["lm_head.weight"] = np.zeros((VOCAB, HIDDEN), np.float32)
  folder = write_llama(tmp_path / "llama", hf, stored, shards)
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  base = make_tiny_config(scan_layers=scan_layers)
  config, params = load_llama(folder, mask_id=mask_id, dtype="float32", base=base)
  m = config.model
  assert m.causal and config.diffusion.objective == "arm"
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (HIDDEN, LAYERS, HEADS, KV_HEADS)
  assert (m.mlp_hidden_size, m.rope_theta, m.rms_norm_eps) == (FFN, 500.0, 1e-5)
  assert (config.tokens.eos_id, config.tokens.bos_id, config.tokens.pad_id) == (2, 1, 2)
  if mask_id is None:  # one appended row is the mask token
    assert m.vocab_size == VOCAB + 1 and config.tokens.mask_id == VOCAB
  else:
    assert m.vocab_size == VOCAB and config.tokens.mask_id == mask_id

  got = np.asarray(logits(config, params, IDS[None]))[0]
  want = numpy_llama(tensors, hf, IDS)
  np.testing.assert_allclose(got[:, :VOCAB], want, rtol=1e-5, atol=1e-5)
  if mask_id is None:  # the mask's logit is the mean logit: its head column is the mean one
    np.testing.assert_allclose(got[:, VOCAB], want.mean(-1), rtol=1e-5, atol=1e-5)
    embedding = np.asarray(params["wte"]["embedding"])
    np.testing.assert_allclose(embedding[VOCAB], tensors["model.embed_tokens.weight"].mean(0))
  # A tied Llama stays tied: one matrix, no head of its own to drift away from the embedding.
  assert m.tie_embeddings == tied and ("ff_out" in params) == (not tied)
  # The same weights under the bidirectional model give other logits: causal=True is what HF is.
  bidirectional = config.copy_and_resolve_references()
  bidirectional.model.causal = False
  other = np.asarray(logits(bidirectional, params, IDS[None]))[0]
  assert np.abs(other[:-1, :VOCAB] - want[:-1]).max() > 1e-2


def test_mistral_config_fields():
  from llada_jax.interop.llama import config_from_llama  # pylint: disable=g-import-not-at-top

  hf = llama_config_json(
      False,
      model_type="mistral",
      sliding_window=32,
      head_dim=8,
      eos_token_id=[5, 6],
      bos_token_id=None,
      pad_token_id=None,
      rope_scaling={"rope_type": "default"},
  )
  del hf["num_key_value_heads"]
  config = config_from_llama(hf, mask_id=90)
  assert config.model.max_sequence_length == 32 and config.model.n_kv_heads == HEADS
  assert config.model.vocab_size == VOCAB and config.tokens.mask_id == 90
  assert (config.tokens.eos_id, config.tokens.bos_id, config.tokens.pad_id) == (5, -1, 5)
  with pytest.raises(ConfigError, match="id different from tokens.mask_id=5"):
    config_from_llama(hf, mask_id=5)


def test_block_size_is_checked_for_block_models_only(tmp_path):
  """diffusion.block_size (default 16) must divide data.sequence_length for a block model only:
  an MDM or ARM of length 100 was refused, and so was every Mistral with sliding_window=100."""
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  from llada_jax.config import validate  # pylint: disable=g-import-not-at-top

  for objective in ("mdm", "arm"):
    config = make_tiny_config(causal=objective == "arm", max_sequence_length=128)
    config.data.sequence_length = 100
    validate(config)
  config.model.causal, config.diffusion.objective = False, "block"
  with pytest.raises(ConfigError) as info:
    validate(config)
  assert str(info.value) == (
      "diffusion.block_size=16 is not allowed: expected positive divisors of "
      "data.sequence_length=100"
  )
  config.diffusion.block_size = 25
  validate(config)
  hf = llama_config_json(False, model_type="mistral", sliding_window=100)
  hf["max_position_embeddings"] = 4096
  config, _ = load_llama(write_llama(tmp_path / "mistral", hf, llama_tensors(False)))
  assert (config.model.max_sequence_length, config.data.sequence_length) == (100, 100)


def test_rope_theta_of_transformers_5_is_read_from_rope_parameters(tmp_path):
  """transformers >= 5 writes RoPE's theta inside rope_parameters (no top-level rope_theta): the
  import takes it from there (the default 10000 would give other logits)."""
  hf = llama_config_json(False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  del hf["rope_theta"], hf["rope_scaling"]
  tensors = llama_tensors(False)
  config, params = load_llama(write_llama(tmp_path / "llama", hf, tensors), dtype="float32")
  assert config.model.rope_theta == 500.0
  got = np.asarray(logits(config, params, IDS[None]))[0, :, :VOCAB]
  want = numpy_llama(tensors, dict(hf, rope_theta=500.0), IDS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _errors(tmp_path, hf: dict, tensors: dict, **kwargs) -> str:
  folder = write_llama(tmp_path / f"f{len(list(tmp_path.iterdir()))}", hf, tensors)
  with pytest.raises((CheckpointError, ConfigError)) as info:
    load_llama(folder, **kwargs)
  message = str(info.value)
  assert "\n" not in message and str(folder) in message, message
  return message


def test_bad_folders_give_one_line_errors(tmp_path):
  hf, tensors = llama_config_json(False), llama_tensors(False)
  scaled = llama_config_json(False, rope_scaling={"rope_type": "llama3", "factor": 8.0})
  assert "rope_scaling={'rope_type': 'llama3', 'factor': 8.0} is not supported" in _errors(
      tmp_path, scaled, tensors
  )
  assert "head_dim=16 is not supported" in _errors(
      tmp_path, llama_config_json(False, head_dim=16), tensors
  )
  assert "attention_bias=True is not supported" in _errors(
      tmp_path, llama_config_json(False, attention_bias=True), tensors
  )
  missing = {n: t for n, t in tensors.items() if n != "model.layers.1.mlp.up_proj.weight"}
  assert "lacks tensor model.layers.1.mlp.up_proj.weight" in _errors(tmp_path, hf, missing)
  untied_head = _errors(tmp_path, hf, {n: t for n, t in tensors.items() if n != "lm_head.weight"})
  assert "lacks tensor lm_head.weight" in untied_head
  wrong = dict(tensors)
  wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
  message = _errors(tmp_path, hf, wrong)
  assert "tensor model.layers.0.self_attn.k_proj.weight has shape [48, 48] in " in message
  assert message.endswith("but the config gives [16, 48]")
  extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
  assert "unexpected tensor model.layers.0.self_attn.q_norm.weight" in _errors(tmp_path, hf, extra)
  assert "mask_id=97 is not allowed" in _errors(tmp_path, hf, tensors, mask_id=VOCAB)


def test_converted_workdir_restores_and_may_be_trained_as_mdm(tmp_path):
  from llada_jax.interop.workdir import from_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  hf, tensors = llama_config_json(True), llama_tensors(True)
  folder = write_llama(tmp_path / "llama", hf, tensors)
  workdir = str(tmp_path / "work")
  count = from_hf(str(folder), workdir, "float32")
  config, params = load_model(workdir)
  assert config.model.causal and config.model.vocab_size == VOCAB + 1
  assert count == sum(x.size for x in jax.tree.leaves(params))
  got = np.asarray(logits(config, params, IDS[None]))[0]
  np.testing.assert_allclose(got[:, :VOCAB], numpy_llama(tensors, hf, IDS), rtol=1e-5, atol=1e-5)
  # llada-train --config.model.causal=False --config.diffusion.objective=mdm resumes from it:
  # neither field shapes the parameters, so the checkpoint is the same model.
  mdm = config.copy_and_resolve_references()
  mdm.model.causal, mdm.diffusion.objective = False, "mdm"
  assert not architecture_mismatch(config, mdm)
  mdm.model.vocab_size = VOCAB
  assert architecture_mismatch(config, mdm)


def init_from_config(folder, **model_changes):
  """A tiny MDM run's config whose model is the tiny Llama's, with train.init_from that folder."""
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  from llada_jax.config import validate  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.model.update(
      dict(
          vocab_size=VOCAB + 1,  # the appended mask row
          d_model=HIDDEN,
          n_layers=LAYERS,
          n_heads=HEADS,
          n_kv_heads=KV_HEADS,
          mlp_hidden_size=FFN,
          rope_theta=500.0,
          rms_norm_eps=1e-5,
      )
  )
  config.model.update(model_changes)
  config.tokens.update(dict(mask_id=VOCAB, eos_id=2, pad_id=2, bos_id=1, eot_id=5))  # <|eot_id|>
  config.data.update(dict(vocabulary="hf", tokenizer=str(folder / "tokenizer.json")))
  config.train.update(dict(init_from=str(folder), num_steps=2, eval_every=2, log_every=1))
  return validate(config)


def _initial_state(config):
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  return create_train_state(config, model, tx, make_mesh(config))[0]


@pytest.fixture(name="llama_with_tokenizer")
def fixture_llama_with_tokenizer(tmp_path):
  folder = write_llama(tmp_path / "llama", llama_config_json(False), llama_tensors(False))
  write_tokenizer(folder)
  return folder


@pytest.mark.parametrize("scan_layers", [True, False])
def test_init_from_starts_from_the_imported_parameters(llama_with_tokenizer, scan_layers):
  config = init_from_config(llama_with_tokenizer, scan_layers=scan_layers)
  state = _initial_state(config)
  assert int(state.step) == 0
  base = config.copy_and_resolve_references()  # the imported model in the run's layer layout
  _, imported = load_llama(llama_with_tokenizer, dtype="float32", base=base)
  got = jax.device_get(state.params)
  assert jax.tree.structure(got) == jax.tree.structure(imported)
  jax.tree.map(np.testing.assert_array_equal, got, imported)
  # Not the random initialisation of the same config.
  config.train.init_from = ""
  random = jax.device_get(_initial_state(config).params)
  assert np.abs(random["wte"]["embedding"] - got["wte"]["embedding"]).max() > 0.1


def test_init_from_trains_mdm_and_a_resumed_run_ignores_it(llama_with_tokenizer, tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top

  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  config = init_from_config(llama_with_tokenizer)
  assert not config.model.causal and config.diffusion.objective == "mdm"
  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO, logger="absl"):  # whatever absl flags set before
    state = train(config, workdir)
  assert "initialised the parameters from train.init_from=" in caplog.text
  assert int(state.step) == 2 and (workdir / "tokenizer.json").is_file()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) == 2 and np.isfinite(losses).all()
  assert np.isfinite([r["loss_bound"] for r in records if r["split"] == "eval"]).all()
  caplog.clear()
  config.train.num_steps = 3
  with caplog.at_level(logging.INFO, logger="absl"):  # whatever absl flags set before
    train(config, workdir)
  assert "ignored: the run resumes from its checkpoint" in caplog.text
  assert "initialised the parameters" not in caplog.text


@pytest.mark.parametrize(
    "field,value,theirs",
    [
        ("d_model", 64, 48),
        ("vocab_size", VOCAB + 2, VOCAB + 1),
        ("rope_theta", 1e4, 500.0),
        # before December 8: a pytree structure ValueError from inside the import
        ("tie_embeddings", True, False),
    ],
)
def test_init_from_refuses_another_model(llama_with_tokenizer, field, value, theirs):
  config = init_from_config(llama_with_tokenizer)
  config.model[field] = value
  if field == "d_model":
    config.model.n_heads = config.model.n_kv_heads = 4
  with pytest.raises(ConfigError) as info:
    _initial_state(config)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(
      f"model.{field}={value!r} is not allowed with train.init_from={llama_with_tokenizer}: "
      f"the imported model has {theirs!r}"
  )
