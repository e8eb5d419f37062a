"""The full config schema with its defaults; every other config starts from it.

Every key a run can use exists here, so ``training.config_check.validate`` can refuse an
unknown key, a wrong type or an unknown name before anything is built. Experiment configs
(``configs/<name>.py``) call :func:`get_config` and change values, never add keys.

Stable keys (other issues build on them): ``train.steps``, ``train.batch_size``,
``train.eval_every``, ``checkpoint.every``, ``mesh.data|fsdp|expert|tensor`` (-1 = the
rest), ``model.name``, ``data.name``, ``seed``, ``model.moe.*``.
"""

import ml_collections

from routezoo.layers.routers import router_config_keys   # importing the routers registers them all


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.name = "decoder_lm"
    m.vocab_size = 258          # byte tokenizer: 256 bytes + pad (0) + eos (1)
    m.num_layers = 2
    m.d_model = 128
    m.num_heads = 4
    m.num_kv_heads = 2           # grouped-query attention (== num_heads: plain MHA)
    m.head_dim = 32
    m.mlp_dim = 512
    m.mlp_type = "swiglu"        # swiglu | geglu | gelu | relu
    m.norm = "rmsnorm"           # rmsnorm | layernorm
    m.norm_eps = 1e-6
    m.tie_embeddings = True
    m.scale_tied_logits = True   # tied logits x @ E^T times d_model**-0.5 (T5); False: plain (HF Llama-style)
    m.max_len = 256
    m.rope_theta = 10000.0
    # Rotary scaling (layers/dense.RopeScaling), used by latent attention (model.attention=mla) only:
    # type=yarn is YaRN (Peng et al. 2023) as transformers computes it; 0 = not set for mscale,
    # mscale_all_dim and attention_factor (None in HF configs).
    m.rope_scaling = ml_collections.ConfigDict()
    m.rope_scaling.type = "none"                        # none | yarn
    m.rope_scaling.factor = 1.0                         # yarn: context extension factor s
    m.rope_scaling.original_max_position_embeddings = 0 # yarn: pretraining context L0 (>= 1 with yarn)
    m.rope_scaling.beta_fast = 32.0                     # yarn: rotations in L0 above which dims extrapolate
    m.rope_scaling.beta_slow = 1.0                      # yarn: rotations in L0 below which dims interpolate
    m.rope_scaling.mscale = 0.0                         # yarn: cos/sin times m(s, mscale)/m(s, mscale_all_dim) if both set
    m.rope_scaling.mscale_all_dim = 0.0                 # yarn: DeepSeek softmax scale times m(s, mscale_all_dim)^2
    m.rope_scaling.attention_factor = 0.0               # yarn: explicit cos/sin factor; 0 = from factor / mscale
    m.rope_scaling.truncate = True                      # yarn: floor/ceil the correction range (transformers' default)
    m.dtype = "auto"             # compute dtype: auto (bf16 on GPU/TPU, f32 on CPU) | bfloat16 | float32
    m.param_dtype = "float32"
    m.attention_impl = "auto"    # jax.nn.dot_product_attention implementation: auto | xla | cudnn
    m.qkv_bias = False           # biases on the q/k/v projections (Qwen2, Qwen2-MoE)
    m.qk_norm = "none"           # RMSNorm of q and k before rotary: none | head (Qwen3) | full (OLMoE, over H*K)
    m.attention = "mha"          # mha (layers/dense.Attention) | mla (multi-head latent attention, DeepSeek-V2/V3: layers/mla.py)
    m.mla_q_lora_rank = 0        # mla: query latent rank Q (with its RMSNorm); 0 = plain query projection
    m.mla_kv_lora_rank = 64      # mla: key/value latent rank R
    m.mla_qk_nope_head_dim = 32  # mla: per-head query/key dims without rotary N
    m.mla_qk_rope_head_dim = 16  # mla: rotary query/key dims P (the rotary key is shared by all heads)
    m.mla_v_head_dim = 32        # mla: value head dim V
    m.mla_rope_interleave = True # mla: rotary pairs (0,1),(2,3),... (DeepSeek checkpoints); False: (i, i+P/2)
    # Deep stacks (routezoo/zoo/stack.py, docs/scale.md): the repeated block under nn.scan, its
    # parameters stacked on a leading `layers` axis (compile time independent of depth); stacks
    # whose routers take per-layer routes from outside (pregate, duo) stay unscanned.
    m.scan_layers = True
    # Activation rematerialisation per block: none | full | dots_saveable | dots_no_batch |
    # save_moe_dispatch | save_moe_dispatch_attn (what the backward pass keeps; the rest is recomputed)
    m.remat = "none"
    m.hf_architecture = ""       # HF class imported from (zoo.hf), the default for export; "" = inferred
    # Feed-forward slot per layer: "mlp" everywhere, "moe" (every `moe.every`-th layer, the
    # others "mlp"), or a comma-separated list with one entry per layer, e.g. "mlp,moe".
    m.ffn = "mlp"
    # Layers whose block is skipped (comma-separated indices, e.g. "2,5"; "" = none): their input
    # passes on unchanged (decoder_lm and encoder_mlm; the layer_skip transform sets it, docs/transforms.md)
    m.skip_layers = ""
    # Masked-token models (model.name=encoder_mlm): fraction of valid (non-padding) positions
    # predicted per sequence; of those 80% -> mask id vocab_size - 1, 10% random id, 10% unchanged (BERT).
    m.mask_rate = 0.15
    # Encoder-decoder (model.name=encoder_decoder, zoo/encoder_decoder.py: T5 / Switch Transformers). The
    # encoder has model.num_layers layers; attention uses T5 relative position buckets, not rotary (rope_theta unused).
    m.num_decoder_layers = 0         # encoder_decoder: decoder layers; 0 = model.num_layers
    m.relative_attention_num_buckets = 32    # encoder_decoder: relative-position buckets N per stack
    m.relative_attention_max_distance = 128  # encoder_decoder: distance where the last (log-spaced) bucket starts
    m.encoder_sparse_step = 0        # encoder_decoder: encoder layer i is MoE iff step == 1 or i % step == 1 (HF Switch); 0 = none
    m.decoder_sparse_step = 0        # encoder_decoder: the same for the decoder layers
    m.expert_capacity = 0            # encoder_decoder: fixed slots per expert and sequence (HF Switch expert_capacity); 0 = from moe.capacity_factor
    m.seq2seq_objective = "prefix_lm"   # encoder_decoder training: prefix_lm (split each packed row) | span_corruption (T5)
    m.seq2seq_split = 0.5            # prefix_lm: each packed row's first fraction is the encoder input, the rest the decoder target
    m.span_noise_density = 0.15      # span_corruption: fraction of each row's tokens masked (T5: 0.15)
    m.span_mean_length = 3.0         # span_corruption: mean masked span length (T5: 3); sentinels take the top ids of model.vocab_size
    m.span_append_eos = True         # span_corruption: end the encoder input and the targets with EOS (id 1), as T5
    m.mtp_depth = 0                  # decoder_lm: DeepSeek-V3 multi-token prediction modules (V3: 1); 0 = none
    m.mtp_weight = 0.3               # weight of their mean cross-entropy in the loss (V3: 0.3, later 0.1)

    moe = m.moe = ml_collections.ConfigDict()
    moe.num_experts = 8
    moe.k = 2
    moe.router = "top_k"               # a name of routezoo.layers.routers.ROUTERS: top_k, expert_choice, deepseek_v3, soft, ...
    moe.dispatch = "dropless"          # capacity | dropless
    moe.capacity_factor = 1.25         # training
    moe.eval_capacity_factor = 2.0     # evaluation
    moe.min_capacity = 4
    moe.expert_dim = 256               # hidden width F of each expert
    moe.expert_type = "swiglu"         # swiglu | gelu | relu (Switch Transformers)
    moe.num_shared_experts = 0         # DeepSeekMoE / Qwen-MoE shared experts
    moe.shared_expert_dim = 0          # 0: same as expert_dim
    moe.shared_expert_gate = False     # Qwen2-MoE: shared experts' output times sigmoid(x @ w), w [D, 1]
    moe.residual_mlp = False           # residual MoE: MoE output + a dense MLP
    moe.every = 1                      # MoE in every N-th layer when model.ffn == "moe"
    moe.renormalize = True             # renormalise top-k weights (ignored for k=1)
    moe.jitter = 0.0                   # multiplicative jitter x*U(1-eps, 1+eps) in training
    moe.load_balance_coef = 0.01       # Switch load-balancing loss
    moe.z_loss_coef = 1e-3             # ST-MoE router z-loss
    moe.bias_update_rate = 0.0         # aux-loss-free balancing (DeepSeek-V3); 0 = off
    moe.batch_prioritized = False      # BPR: fill capacity by top-1 probability (not causal: encoders only)
    moe.capacity_fill = "token"        # capacity dispatch queue order: token (each token's copies together; causal) | slot (GShard: all first choices first; encoders only for k >= 2)
    moe.group_size = 0                 # routing-group size in tokens; 0 = one group per sequence
    moe.gmm_backend = "auto"           # auto (blocked on CPU, pallas on GPU, megablox on TPU) | pallas | mosaic (Hopper) | megablox | blocked | ragged_dot | dense
    moe.ep_exchange = "auto"           # dropless expert parallel: auto (padded on CPU/GPU, ragged on TPU) | padded | ragged | ragged_emulated (CPU tests)
    moe.expert_map = ""                # "" = identity; else the physical expert of each router output, e.g. "0,0,1,2" (router width 4 over num_experts experts); ";" between per-MoE-layer maps (docs/transforms.md)
    moe.router_init_scale = 0.1
    moe.router_precision = "float32"   # router logits matmul: float32 (exact) | bf16_3x (3 bf16 tensor-core passes, ~f32 accuracy, faster on GPUs)
    # Router-specific keys (moe.hash_seed, moe.thor_*, moe.duo_*, ...): each router class declares
    # the keys it reads with their defaults (Router.config_keys, each key documented in the
    # router's module); the schema holds the union over every registered router.
    for key, default in router_config_keys().items():
        moe[key] = default

    # ---------------------------------------------------------------- mesh
    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = -1
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    mesh.rules = ""   # "" = layers.sharding.DEFAULT_RULES; else JSON list of [logical, mesh_axes]

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.name = "stdlib"            # stdlib (offline, Python's own sources) | shakespeare (docs/data.md) | files (data.files) | any TFDS dataset name
    d.data_dir = ""              # TFDS data dir; "" = $ROUTEZOO_DATA_DIR or ~/tensorflow_datasets
    d.text_key = "text"          # field holding the text (TFDS features, .jsonl keys, .parquet columns)
    # data.name=files: your own files, streamed (docs/data.md)
    d.files = ""                 # comma-separated globs of .txt, .jsonl, .jsonl.gz, .parquet, .array_record
    d.eval_files = ""            # globs of the validation files; "" = a hash split of data.files by data.eval_fraction
    d.eval_fraction = 0.01       # share of documents (by a hash of their text) held out for validation
    d.txt_unit = "file"          # what one document of a .txt file is: file | paragraph (blank-line separated) | line
    d.shuffle_buffer = 1024      # data.name=files: documents shuffled together in one window (memory: one window)
    d.format = "text"            # text (pretraining) | chat (prompt/completion or messages; loss on completions only)
    d.prompt_key = "prompt"      # data.format=chat: record fields
    d.completion_key = "completion"
    d.messages_key = "messages"  # a list of {"role", "content"}; the loss covers the assistant turns
    d.packing = "masked"         # masked (segment ids: attention stays inside a document, positions restart) | eos (documents joined, attention crosses them)
    d.train_split = "train"
    d.eval_split = "validation"
    d.seq_len = 128
    d.tokenizer = "auto"         # auto (hf from init.from_hf when it holds a tokenizer.json, else byte) | byte | sentencepiece | hf
    d.tokenizer_path = ""        # data.tokenizer=hf: a tokenizer.json, or a directory holding one (special ids from its tokenizer_config.json / config.json)
    d.spm_model = ""             # path to a SentencePiece model; "" = train one on the train split
    d.spm_vocab_size = 4096
    d.shuffle = True
    d.num_workers = 0            # grain worker processes (0 = in-process)
    # rows: every process packs the global stream and keeps its rows (results independent
    # of the process count); documents: each process reads its own share of documents.
    d.process_sharding = "rows"
    # Tasks (multi-task adapters; stdlib only): comma-separated top-level stdlib packages,
    # e.g. "email,json,asyncio"; task id = position; batches gain task_id [B] and no row
    # mixes tasks. "" = off. data.available_tasks(config.data) lists the names.
    d.tasks = ""
    d.task_sampling = "uniform"  # rows per task: uniform (equal) | proportional (to the task's train bytes)

    # ---------------------------------------------------------------- train
    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 16            # global batch, in sequences
    t.grad_accum = 1             # micro-batches per step
    t.eval_every = 200
    t.eval_steps = 8             # batches per evaluation
    t.eval_per_task = False      # with data.tasks: also eval_loss@task=NAME on each task's validation rows
    t.log_every = 10
    t.progress = True            # progress bar on process 0
    # A non-finite loss or gradient norm (docs/runs.md): stop (exit 3; checkpoints before it kept,
    # nothing saved after it) | skip (the update is dropped, params and optimizer state unchanged,
    # the step number advances; counted in the metric skipped_steps)
    t.on_nonfinite = "stop"
    t.spike_factor = 0.0         # > 1: a loss above spike_factor x its running mean counts as non-finite too; 0 = off
    t.max_consecutive_skips = 20 # on_nonfinite=skip: this many skipped steps in a row stop the run as diverged (exit 3)

    o = c.optimizer = ml_collections.ConfigDict()
    o.name = "adamw"             # adamw | adafactor | sgd
    o.learning_rate = 3e-3
    o.schedule = "cosine"        # cosine | linear | constant
    o.warmup_steps = 50
    o.end_lr_fraction = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.weight_decay_mask = "matrices"   # matrices (ndim >= 2, no embeddings) | all | none
    o.clip_norm = 1.0            # global-norm clipping; 0 = off

    # Distillation from a frozen teacher (training/distill.py, docs/runs.md): the loss gains
    # weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)), a per-token mean. Off
    # ("" teacher or weight 0): the step is the plain one.
    dl = c.distill = ml_collections.ConfigDict()
    dl.teacher_workdir = ""      # workdir of a trained run with the same vocabulary and objective; "" = off
    dl.weight = 1.0              # weight of the KL term (0 = off: the teacher is not loaded)
    dl.temperature = 1.0         # T > 0: softens both distributions; the term is scaled by T^2 (Hinton et al. 2015)

    ck = c.checkpoint = ml_collections.ConfigDict()
    ck.every = 200
    ck.keep = 3
    ck.async_save = True
    ck.verify = True             # checksum manifest written with each save, checked on restore
    # Every kept checkpoint corrupt (docs/runs.md): stop (one line, exit 2, nothing moved) |
    # restart (move them to checkpoints/corrupt/ and train from step 0)
    ck.on_corrupt = "stop"

    # ---------------------------------------------------------------- init
    i = c.init = ml_collections.ConfigDict()
    # Start from pretrained weights: a Hugging Face checkpoint directory (config.json +
    # *.safetensors) or the output of `routezoo convert`; "" = random init.
    i.from_hf = ""
    # Start from another run's trained parameters: its workdir (config.json + checkpoints/).
    # CLI: --config.init.from=DIR is accepted as the spelling of --config.init.from_workdir=DIR
    # ("from" is a Python keyword, which config_flags cannot parse as a key).
    i.from_workdir = ""
    # Start the adapter from another adapter run's trained adapter (its workdir, or its
    # adapter/ directory), e.g. Poly/MHR few-shot modes from the multi-task adapter.
    i.adapter_from = ""
    # Start a LoRA (or DoRA) run from a Hugging Face peft adapter directory (adapter_config.json +
    # adapter_model.safetensors) trained on the init.from_hf base: adapter.method, rank, alpha,
    # rslora, targets and lora_dropout are taken from it (zoo/hf/peft.py).
    i.from_peft = ""

    # ---------------------------------------------------------------- adapter
    # Parameter-efficient fine-tuning (layers/adapters/base.py): the base parameters are frozen
    # (not in the optimizer state, not in the train checkpoint); the adapter's parameters
    # train and are saved to WORKDIR/adapter/ with the base's fingerprint.
    a = c.adapter = ml_collections.ConfigDict()
    a.method = ""                # "" = no adapter (full training) | lora | dora | pissa | mos | hydra | poly | mhr | mhr_z | mhr_mu | scalearn | phatgoose_gate | phatgoose | glider | multi_lora | rps
    a.targets = ""               # regex over parameter paths, matched at the end, e.g. "attn/(q|v)", "mlp/.*"
    # Trained adapters that a method combines (scalearn, phatgoose, glider, multi_lora):
    # comma-separated workdirs (or their adapter/ directories), all trained on this base.
    a.library = ""
    a.rank = 8                   # lora, dora, pissa: rank r (pissa: <= min(d_in, d_out)); mos: active rank r; hydra: parallel rank r_p
    a.alpha = 16.0               # lora, dora, mos: scale alpha / r (pissa: scale 1, alpha unused)
    a.rslora = False             # lora, dora: rsLoRA scale alpha / sqrt(r)
    a.lora_dropout = 0.0         # lora, dora, mos: dropout on the adapter's input x in training (MoS recipe 0.1); hydra: on both branches' low-rank activations (ViT recipe 0.2)
    # dora (Liu et al. 2024): W' = m (W + s A B) / ||W + s A B||_c, m a magnitude per output unit (init: the
    # column norms of W). pissa (Meng et al. 2024): A, B from the top-r SVD of W, frozen residual W - A B.
    a.dora_detach_norm = True    # dora: the column norm is a constant in backprop (paper sec. 4.3; False: exact gradient)
    # mos (Mixture of Shards, Wang et al. 2025): rank = active rank r, scale alpha / r; per projection
    # type one pool of A- and B-shards shared by all layers, picked by frozen random indices.
    a.mos_equiv_rank = 2         # mos: r_eq, parameters = LoRA at rank r_eq (pool P = r_eq * layers * n)
    a.mos_private_rank = 1       # mos: r_pri rank vectors per layer on private shards (0 = no privatisation)
    a.mos_shards_per_vector = 1  # mos: n shards per rank vector (vector sharding; 1 = off); divides d_in, d_out
    a.mos_subset_selection = True   # mos: each layer draws its own public-shard subset (False: all share one)
    a.mos_pair_dissociation = True  # mos: B's shard indices drawn independently of A's (False: B uses A's)
    a.mos_seed = 0               # mos: seed of the index buffers (regenerated from it, saved in adapter.json)
    # hydra (Kim et al. 2023): rank = r_p of the parallel LoRA branch on x; a sequential branch on the
    # base output W x (+ b). Merged: W' = W + s (A_p B_p + W A_s B_s).
    a.hydra_seq_rank = 8         # hydra: rank r_s of the sequential branch (>= 1)
    a.hydra_scale = 1.0          # hydra: s, the factor of both branches (alpha is not used)
    # poly / mhr / mhr_z / mhr_mu (Ponti et al. 2022; Caccia et al. 2023): rank = R of each skill (scale 1/R, alpha unused);
    # every example's task id (data.tasks) picks its router row.
    a.num_tasks = 0              # poly, mhr, mhr_z: router rows T (0 = the number of data.tasks)
    a.poly_skills = 8            # poly, mhr: M LoRA skills per adapted weight
    a.mhr_heads = 4              # mhr, mhr_z, mhr_mu: H routing heads (divides d_in and d_out)
    a.poly_router_lr_mult = 100.0  # poly, mhr, mhr_z: router learning rate / adapters' (card: 0.1 vs 1e-3)
    a.poly_relaxed = True        # poly, mhr, mhr_z: relaxed-Bernoulli skill weights in training (False: sigmoid)
    # multi_lora (S-LoRA/Punica): serve the adapter.library LoRAs (mixed ranks and targets)
    # in one batch, each example with its own adapter by batch 'task_id' (0 = base model, n = library
    # entry n); frozen, never merged. targets ".*" serves every weight the library adapts.
    a.multi_lora_impl = "auto"   # multi_lora: auto (= gather, measured faster) | gather (BGMV) | sorted (SGMV, prefill path)
    a.multi_lora_gmm_backend = "auto"   # multi_lora sorted: grouped matmul (layers/moe/dropless.py GMM_BACKENDS; auto by platform)
    # scalearn, phatgoose_gate, phatgoose, glider (layers/adapters/library.py, layers/adapters/phatgoose.py):
    # combine the LoRA runs of adapter.library (copied into this adapter, frozen); only the
    # method's own parameters train (scalearn: omega; phatgoose_gate: gates; phatgoose: none).
    a.scalearn_uniform = False   # scalearn: one scalar omega per adapter ([K]) instead of per output feature ([K, O])
    a.scalearn_shared = False    # scalearn: one omega per projection type shared by all layers (ScaLearn++, Uniform++)
    a.scalearn_dropout = 0.3     # scalearn: dropout on omega itself while training, in [0, 1) (0 = off)
    a.library_top_k = 2          # phatgoose, glider: library experts per token (softmax, top-k, renormalised)
    a.glider_lambda = 3.0        # glider: lambda, scale of the global (task-similarity) logits (3 held-out, 100 held-in)
    a.glider_task_similarity = ""  # glider: g, one cosine similarity per library entry, comma-separated (task_similarity)
    a.glider_train_router = False  # glider: train the local router W_gate (init: the library's gates); False = frozen
    # rps (randomized parameter sharing, layers/adapters/rps.py): trains FROM SCRATCH; every target
    # weight is lambda * sign * M[hash] of one global trainable M [ceil(c * n)]; all other weights train dense.
    a.rps_compression = 0.1      # rps: c in (0, 1], m = ceil(c * n) shared weights for the n target weights
    a.rps_mapping = "stable"     # rps: stable (STABLE-RPS RandomFold; injective at c = 1) | roast (ROAST tiles)
    a.rps_tile = 8               # rps: roast tile BK = BN (each tile a contiguous slice of M)
    a.rps_init_std = 0.01        # rps: M ~ U(+-init_std); lambda = std(weight's init) / init_std
    a.rps_seed = 0               # rps: seed of the index and sign hashes (recomputed in jit, never stored)
    a.rps_grad_scaler = True     # rps: divide slot j's gradient by (sum lambda)^2 / count_j (STABLE-RPS)

    return c
