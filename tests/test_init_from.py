"""train.init_from=HF_DIR takes the folder's vocabulary (its tokenizer.json as vocabulary "hf", its
special ids, vocab_size with the appended mask row) or refuses, before step 1 and before anything
is written; a resumed run keeps the vocabulary its checkpoint was trained with. The Llama here has
300 tokens, so a byte config's mask id 259 is one of its real tokens (the silent failure: it was
trained on byte ids with token 259 as the mask)."""

import json
import logging

import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax import checkpoint
from llada_jax.config import validate
from llada_jax.errors import CheckpointError, ConfigError
from test_llama_import import (
    FFN,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    llama_config_json,
    llama_tensors,
    write_llama,
    write_tokenizer,
)

WORDS = 300  # the Llama's vocabulary


@pytest.fixture(name="bpe_llama")
def fixture_bpe_llama(tmp_path):
  """A tiny Llama with a 300-row vocabulary and its BPE tokenizer.json (<s> 1, </s> 2,
  <|eot_id|> 5)."""
  tensors = llama_tensors(False)
  rng = np.random.RandomState(1)
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    extra = 0.3 * rng.randn(WORDS - len(tensors[name]), HIDDEN)
    tensors[name] = np.concatenate([tensors[name], extra.astype(np.float32)])
  folder = write_llama(tmp_path / "llama", llama_config_json(False, vocab_size=WORDS), tensors)
  write_tokenizer(folder)
  return folder


def tiny_config(folder=None, **changes):
  """configs/tiny.py's byte vocabulary and ids with the Llama's sizes (what a user types)."""
  config = make_tiny_config(
      d_model=HIDDEN,
      n_layers=LAYERS,
      n_heads=HEADS,
      n_kv_heads=KV_HEADS,
      mlp_hidden_size=FFN,
      rope_theta=500.0,
      rms_norm_eps=1e-5,
      vocab_size=WORDS,
  )
  config.train.update(dict(num_steps=1, eval_every=1, log_every=1, init_from=str(folder or "")))
  config.checkpoint.save_every = 1
  for key, value in changes.items():
    section, field = key.split("__")
    config[section][field] = value
  return validate(config)


def test_init_from_takes_the_folders_vocabulary_tokenizer_and_ids(bpe_llama):
  from llada_jax.training.state import config_with_init_from  # pylint: disable=g-import-not-at-top

  config = tiny_config(bpe_llama)
  assert (config.data.vocabulary, config.tokens.mask_id) == ("byte", 259)
  got = config_with_init_from(config)
  assert got.data.vocabulary == "hf"
  assert got.data.tokenizer == str((bpe_llama / "tokenizer.json").absolute())
  assert got.tokens.to_dict() == dict(mask_id=WORDS, pad_id=2, eos_id=2, bos_id=1, eot_id=5)
  assert got.model.vocab_size == WORDS + 1  # the appended mask row
  assert config.data.vocabulary == "byte"  # the caller's config is left as it was
  # Everything else is the run's: the objective, the sequence length, the training settings.
  assert got.diffusion.objective == "mdm" and not got.model.causal
  assert got.data.sequence_length == config.data.sequence_length


def test_init_from_trains_on_the_folders_tokens_and_a_resume_keeps_them(
    bpe_llama, tmp_path, caplog
):
  """configs/tiny.py's settings plus init_from: the run is stored with the folder's vocabulary
  and the imported parameters (rows 0..299 the Llama's, row 300 the mask); the same command then
  resumes with the stored vocabulary, not its own byte one."""
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  config = tiny_config(bpe_llama)
  train(config, workdir)
  stored = checkpoint.load_config(workdir)
  assert (stored.data.vocabulary, stored.model.vocab_size) == ("hf", WORDS + 1)
  assert stored.tokens.to_dict() == dict(mask_id=WORDS, pad_id=2, eos_id=2, bos_id=1, eot_id=5)
  _, params = load_model(str(workdir))
  assert params["wte"]["embedding"].shape == (WORDS + 1, HIDDEN)
  kept = (workdir / "tokenizer.json").read_bytes()
  assert kept == (bpe_llama / "tokenizer.json").read_bytes()
  config.train.num_steps = 2
  with caplog.at_level(logging.WARNING, logger="absl"):
    train(config, workdir)
  assert "resumes with the vocabulary of its checkpoint" in caplog.text
  stored = checkpoint.load_config(workdir)
  assert checkpoint.latest_step(workdir) == 2
  assert (stored.data.vocabulary, stored.model.vocab_size, stored.tokens.mask_id) == (
      "hf",
      WORDS + 1,
      WORDS,
  )
  assert (workdir / "tokenizer.json").read_bytes() == kept


def test_the_readme_resume_route_keeps_the_converted_vocabulary(bpe_llama, tmp_path, caplog):
  """llada-convert from-hf, then llada-train on that workdir with configs/tiny.py and
  causal=False, objective=mdm: the stored vocabulary was rewritten to byte (mask id 259)."""
  from llada_jax.interop.workdir import from_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "converted"
  from_hf(str(bpe_llama), str(workdir), "float32")
  before = checkpoint.load_config(workdir)
  config = tiny_config(model__vocab_size=WORDS + 1)
  with caplog.at_level(logging.WARNING, logger="absl"):
    train(config, workdir)
  assert "data.vocabulary='hf' (the config has 'byte')" in caplog.text
  stored = checkpoint.load_config(workdir)
  assert stored.diffusion.objective == "mdm" and not stored.model.causal
  assert stored.data.vocabulary == "hf" and stored.tokens.to_dict() == before.tokens.to_dict()
  assert (workdir / "tokenizer.json").read_bytes() == (bpe_llama / "tokenizer.json").read_bytes()


def _refused(error, config, workdir) -> str:
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  with pytest.raises(error) as info:
    train(config, workdir)
  message = str(info.value)
  assert "\n" not in message, message
  assert not (workdir / "checkpoints").exists()  # nothing left behind to resume from
  return message


def test_a_refused_init_from_leaves_no_checkpoints(bpe_llama, tmp_path):
  missing = tmp_path / "nowhere"
  # Refused before the data: the unknown task would otherwise be named first.
  config = tiny_config(missing, data__task="no_such_task")
  message = _refused(ConfigError, config, tmp_path / "a")
  assert message.startswith(f"train.init_from={missing} is not allowed: ")
  assert "no config.json" in message
  config = tiny_config(bpe_llama, model__d_model=64, model__n_heads=4, model__n_kv_heads=4)
  message = _refused(ConfigError, config, tmp_path / "b")
  assert message.startswith(f"model.d_model=64 is not allowed with train.init_from={bpe_llama}")
  hf = json.loads((bpe_llama / "config.json").read_text())
  (bpe_llama / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=LAYERS + 1)))
  config = tiny_config(bpe_llama, model__n_layers=LAYERS + 1)
  assert "lacks tensor model.layers.2" in _refused(CheckpointError, config, tmp_path / "c")


def test_mask_embedding_noise_perturbs_only_the_mask_row_at_its_scale(bpe_llama):
  """train.mask_embedding_noise: the imported mask row (the mean of the Llama's rows) gains noise
  of that many standard deviations of the table; every other parameter is the folder's."""
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import config_with_init_from, create_train_state  # pylint: disable=g-import-not-at-top

  def start(noise):
    config = config_with_init_from(tiny_config(bpe_llama, train__mask_embedding_noise=noise))
    mesh = make_mesh(config, jax.devices()[:1], check_batch=False)
    state, _ = create_train_state(config, MaskedDiffusionLM(config), make_optimizer(config), mesh)
    return jax.tree.map(np.asarray, state.params)

  plain, noisy = start(0.0), start(3.0)
  table = llama_tensors(False)["model.embed_tokens.weight"]
  rows = np.concatenate([table, 0.3 * np.random.RandomState(1).randn(WORDS - len(table), HIDDEN)])
  np.testing.assert_allclose(plain["wte"]["embedding"][WORDS], rows.mean(0), rtol=1e-5, atol=1e-6)
  moved = noisy["wte"]["embedding"] - plain["wte"]["embedding"]
  assert not moved[:WORDS].any()
  spread = moved[WORDS].std() / plain["wte"]["embedding"].std()
  assert 1.5 < spread < 4.5, spread  # 3 standard deviations, from HIDDEN draws
  plain["wte"], noisy["wte"] = None, None
  jax.tree.map(np.testing.assert_array_equal, plain, noisy)
  with pytest.raises(ConfigError, match="train.mask_embedding_noise"):
    tiny_config(None, train__mask_embedding_noise=0.5)


def test_init_from_a_workdir_starts_the_next_stage_from_its_newest_parameters(tmp_path):
  """A recipe's stage starts from the previous stage's workdir: an ARM's parameters (not its
  optimizer state) start a block model, which reads each token from its predecessor's logits
  (alignment "shifted", as from any AR start); another architecture is refused in one line."""
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import config_with_init_from, create_train_state  # pylint: disable=g-import-not-at-top

  arm = make_tiny_config(causal=True)
  arm.train.update(dict(num_steps=2, eval_every=2))
  train(validate(arm), tmp_path / "arm")
  _, trained = load_model(str(tmp_path / "arm"))

  block = make_tiny_config()
  block.diffusion.update(dict(objective="block", block_size=4))
  block.train.update(dict(num_steps=1, eval_every=1, init_from=str(tmp_path / "arm")))
  config = config_with_init_from(validate(block))
  mesh = make_mesh(config, jax.devices()[:1], check_batch=False)
  state, _ = create_train_state(config, MaskedDiffusionLM(config), make_optimizer(config), mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), trained)
  assert int(state.step) == 0 and not any(
      np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state) if np.ndim(m) > 1
  )
  train(validate(block), tmp_path / "block")
  stored = checkpoint.load_config(tmp_path / "block")
  assert (stored.diffusion.objective, stored.diffusion.logit_alignment) == ("block", "shifted")

  wider = make_tiny_config(d_model=128)
  wider.train.init_from = str(tmp_path / "arm")
  with pytest.raises(ConfigError, match="model.d_model=128 is not allowed with train.init_from"):
    config_with_init_from(validate(wider))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  wider.train.init_from = str(tmp_path / "empty")
  with pytest.raises(ConfigError, match="holds no readable checkpoint"):
    config_with_init_from(validate(wider))
