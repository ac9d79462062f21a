"""Benchmark cer_nb against the tools a researcher would use instead.

Compared, side by side in one run, each measurement in its own fresh process, trials interleaved (A, B, B, A, ...):

1. training throughput of one stage: `cer_nb.train.train_stage` (prompt layout `--layout`, the prefix every row shares
   computed once per batch) vs TRL's `SFTTrainer` set up as TRL's documentation shows for vision-language models (a
   dataset of `messages` + `images`, `processing_class=processor`, TRL's own vision-language collator), on the same
   model, data, prompt, batch size and LoRA settings; and `cer_nb-unshared`: cer_nb as it was (image first, no sharing);
2. evaluation: scoring every candidate label (`label_logprobs`, shared prefix) vs generate-and-parse (`generate_answers`
   + `find_label`) on the same test split, prompt and trained adapter: images/s, accuracy, unparseable rate, forward
   passes per batch; `score-unshared` (every face runs the whole prompt); and two floors: `floor` (the whole prompt
   once per face, as any reader that does not share it must) and `floor-face` (only the per-face work: each face's
   image and question on top of the shared prefix, computed once for the evaluation);
3. `predict`: latency for one image and throughput for a batch, on a loaded model;
4. peak memory of each (peak resident set size of the measuring process, `ru_maxrss`);
5. how each grows with the work: dataset size, image resolution (visual tokens), number of candidate labels, batch
   size, prompt length (variants bare / options / context / cues);
6. `--only 2b`: the same shared-vs-unshared comparisons on the real-dimension Qwen2-VL-2B-Instruct replica (random
   weights) on this machine: seconds per training step, images/s of scoring, peak memory (a slow arm: minutes).

Any supported family (`--family`, a `model_type` of `cer_nb.lvlm.FAMILIES`): qwen2_vl, the default, runs the pre-trained tiny
Qwen2-VL shipped in cer_nb/assets; every other family its tiny replica (`cer_nb.replicas.make_tiny_replica`), whose weights are
random: its accuracies mean nothing, its speeds and memory are what is measured. An arm that does not support a family (TRL's
trainer, for some) is reported and left out of the run, not fatal.

Usage (from the repository root):
    python benchmarks/bench.py --quick                     # a smoke run, 1-2 min on 2 CPU cores
    python benchmarks/bench.py --quick --family gemma3     # the same on Gemma 3's tiny replica (random weights)
    python benchmarks/bench.py                             # the full run, ~18 min on 2 CPU cores
    python benchmarks/bench.py --device cuda --model-size 2b   # on a GPU: Qwen2-VL-2B-Instruct replica, random weights, bf16
    python benchmarks/bench.py --only 2b                   # the 2B replica on this CPU: shared vs unshared (~15 min on 2 cores)
    python benchmarks/bench.py --check-2b                  # build the 2B config on the meta device and count its parameters
Results: a table on stdout and benchmarks/results/<machine-tag>.json (written atomically).
"""
from __future__ import annotations
import argparse, datetime, json, math, os, platform, re, resource, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = 1
DEFAULT_FAMILY = 'qwen2_vl'  # the family of the pre-trained tiny model shipped in cer_nb/assets
PARTS = {'train', 'eval', 'predict', 'scaling', '2b'}  # what --only may name
# What a full run and a --quick run measure. Quick: one trial, a few steps and faces, no scaling unless --only names it.
SIZES = {'full': dict(trials=5, steps=70, adapter_steps=250, parts='train,eval,predict,scaling', n_test=None, latency_reps=30, n_batch=64,
                      resolutions=(100, 200, 300), resolution_steps=24, n_train=(140, 280, 560), n_scaling_test=64, n_eval=(32, 64, 140),
                      steps_2b=4, n_test_2b=16),
         'quick': dict(trials=1, steps=6, adapter_steps=4, parts='train,eval,predict', n_test=32, latency_reps=5, n_batch=16,
                       resolutions=(100, 200), resolution_steps=6, n_train=(140, 280), n_scaling_test=32, n_eval=(16, 32), steps_2b=2, n_test_2b=8)}
# Peak dense bf16 tensor throughput (TFLOP/s) of GPUs by name, for model FLOPs utilisation; override with --peak-tflops.
PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0, 'A10': 125.0, 'T4': 65.0}

# ----------------------------------------------------------------------------------------------------------------
# Machine information

def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def package_versions(*packages) -> dict:
    "The installed version of each package (None if absent), without importing it."
    from importlib.metadata import version, PackageNotFoundError
    out = {}
    for pkg in packages:
        try: out[pkg] = version(pkg)
        except PackageNotFoundError: out[pkg] = None
    return out

def machine_info(device:str, allow_dirty:bool=False) -> dict:
    "The machine, the code (commit, dirty flag, code fingerprint) and the package versions a result was measured with; a dirty tree refused unless allowed."
    import torch
    from cer_nb.runs import require_clean
    prov = require_clean(allow_dirty, 'the benchmark', HERE)  # the commit, its dirty flag and the library versions, as a run records them
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform(), device=device, gpu=None,
                memory_gb=round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
                versions={**prov['versions'], **package_versions('trl', 'datasets')}, git_commit=prov['git_commit'], git_dirty=prov['git_dirty'],
                dirty_files=prov.get('dirty_files'), allowed_dirty=prov.get('allowed_dirty'), code=prov.get('code'))
    if device == 'cuda' and torch.cuda.is_available(): info['gpu'] = torch.cuda.get_device_name(0)
    return info

def stage_lora() -> dict:
    "The LoRA settings of `cer_nb.train.StageConfig`'s defaults, which the cer_nb arm trains with and the TRL arm is given."
    from cer_nb.train import StageConfig
    c = StageConfig('base')
    return dict(preset=c.lora_preset, r=c.lora_r, alpha=c.lora_alpha or 2 * c.lora_r, dropout=c.lora_dropout)

def slug(s:str) -> str: return re.sub(r'[^a-z0-9]+', '-', s.lower()).strip('-')

def machine_tag(info:dict, family:str, model_size:str, quick:bool) -> str:
    "The result file's name: the machine, the family (unless the default), the model size, whether quick."
    hw = f"gpu-{slug(info['gpu'])}" if info['gpu'] else f"cpu-{slug(info['cpu'])[:40]}-{info['cores']}c"
    return f"{hw}-" + ('' if family == DEFAULT_FAMILY else f'{slug(family)}-') + model_size + ('-quick' if quick else '')

# ----------------------------------------------------------------------------------------------------------------
# The base model: the shipped pre-trained tiny Qwen2-VL, another family's tiny replica, or Qwen2-VL-2B-Instruct's replica

def base_model(family:str, model_size:str, work:Path) -> dict:
    "The checkpoint folder the benchmark runs on (`base`), what its weights are (`weights`), and whether they are random."
    if model_size == '2b':
        from cer_nb.qwen2vl import make_qwen2vl_2b
        return dict(base=str(make_qwen2vl_2b(work/'qwen2vl-2b-random')), random_weights=True,  # built once (4.4 GB), then reused
                    weights='Qwen2-VL-2B-Instruct replica: real config and tokenizer, RANDOM weights (cer_nb.qwen2vl.make_qwen2vl_2b)')
    if family == DEFAULT_FAMILY:
        from cer_nb.pretrain import tiny_base
        return dict(base=tiny_base(), random_weights=False, weights='pre-trained tiny Qwen2-VL shipped in cer_nb/assets (cer_nb.pretrain.tiny_base)')
    from cer_nb.replicas import make_tiny_replica
    return dict(base=str(make_tiny_replica(family, work/f'replica-{family}', seed=0)), random_weights=True,  # deterministic: rebuilt every run
                weights=f'tiny {family} replica, RANDOM weights (cer_nb.replicas.make_tiny_replica, seed 0)')

def count_2b_params() -> dict:
    "Instantiate Qwen2-VL-2B-Instruct's config (`cer_nb.qwen2vl.QWEN2VL_2B_CONFIG`) on the meta device (no weights) and count its parameters."
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig
    from cer_nb.qwen2vl import QWEN2VL_2B_CONFIG
    with torch.device('meta'): model = AutoModelForImageTextToText.from_config(Qwen2VLConfig.from_dict(QWEN2VL_2B_CONFIG))
    uniq = {id(p): p for p in model.parameters()}.values()  # tied embeddings counted once
    n = sum(p.numel() for p in uniq)
    vis = sum(p.numel() for p in model.model.visual.parameters())
    return dict(params=n, vision_params=vis, language_params=n - vis, on_meta=all(p.is_meta for p in uniq))

# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs of a Qwen2-VL training step, for model FLOPs utilisation on a GPU

def train_step_flops(cfg, n_text_tokens:int, n_patches:int, logit_positions:int, seq_len:int, patches_per_image:int) -> float:
    "Model FLOPs of one LoRA training step (frozen base): LM forward + activation backward, vision forward only."
    t, v = cfg.text_config, cfg.vision_config
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    lm_layer = 2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size  # q, o + k, v + MLP
    lm_fwd = 2 * n_text_tokens * t.num_hidden_layers * (lm_layer + 2 * seq_len * h) + 2 * logit_positions * h * t.vocab_size
    e = v.embed_dim
    vis_layer = 4 * e * e + 2 * e * e * v.mlp_ratio
    merged = n_patches // v.spatial_merge_size ** 2
    vis_fwd = 2 * n_patches * (v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * e + v.depth * (vis_layer + 2 * patches_per_image * e))
    vis_fwd += 2 * merged * ((4 * e) ** 2 + 4 * e * v.hidden_size)
    return 2 * lm_fwd + vis_fwd  # backward through the frozen LM ~ its forward; the frozen vision tower needs none

# ----------------------------------------------------------------------------------------------------------------
# Data: the synthetic RAF-DB compound subset, with copies at other resolutions

def image_max_pixels(family:str, px:int) -> int|None:
    "`max_pixels` that lets a px x px face keep its size; None where the family's own cap does, or is not a pixel count (it is kept)."
    from cer_nb.lvlm import FAMILIES
    size = FAMILIES[family].image_cap.get('size', {})
    if not {'shortest_edge', 'longest_edge'} <= set(size): return None  # resized to a fixed size, or capped by edge length
    need = (px + 16) ** 2  # the face, its sides rounded to any patch grid up to 32 pixels (Qwen2-VL's is 28, Qwen3-VL's 32)
    return need if need > size['longest_edge'] else None

def prepare_data(root:Path, resolutions) -> dict:
    "Synthetic RAF-DB under `root` and CSVs (path, label) of the compound train/test splits at each resolution."
    from PIL import Image
    from cer_nb.synth import make_synthetic_rafdb
    from cer_nb.data import load_rafdb
    from cer_nb.core import write_atomic
    data = make_synthetic_rafdb(root/'rafdb', n_basic=70, n_compound=700, seed=0)
    out = {}
    for split in ('train', 'test'):
        df = load_rafdb(data, 'compound', split)[['path', 'label']]
        for px in resolutions:
            csv = root/f'compound_{split}_{px}.csv'
            if not csv.exists():
                rows = df.copy()
                if px != 100:  # aligned RAF-DB faces are 100x100: larger copies, lossless, read by both arms alike
                    d = root/f'compound_{px}'; d.mkdir(exist_ok=True)
                    rows['path'] = [str(d/(Path(p).stem + '.png')) for p in df.path]
                    for src, dst in zip(df.path, rows.path):  # written whole or not at all: a killed run leaves no half image behind
                        if not Path(dst).exists():
                            Image.open(src).convert('RGB').resize((px, px), Image.BILINEAR).save(dst + '.tmp', format='PNG'); os.replace(dst + '.tmp', dst)
                write_atomic(csv, rows.to_csv(index=False))
            out[f'{split}_{px}'] = str(csv)
    return out

# ----------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one line `RESULT {json}`

def rss_mb() -> float:
    "Current resident set size of this process (MB)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    return float('nan')

def peak_rss_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB

def _setup_worker(spec):
    import torch, warnings
    warnings.filterwarnings('ignore')
    torch.set_num_threads(spec['threads'])
    if spec['device'] == 'cuda': torch.cuda.reset_peak_memory_stats()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    try:
        from datasets.utils import logging as ds_logging
        ds_logging.set_verbosity_error(); ds_logging.disable_progress_bar()
    except ImportError: pass

def _gpu_peak_mb(spec):
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if spec['device'] == 'cuda' else None

def _train_rows(spec):
    import pandas as pd
    df = pd.read_csv(spec['train_csv'])
    return df.sample(frac=1, random_state=0).iloc[:spec['n_train']].reset_index(drop=True) if spec.get('n_train') else df

def _step_clock():
    import time
    from transformers import TrainerCallback
    class StepClock(TrainerCallback):
        "Wall-clock times of the training loop: its start, the end of every optimiser step, its end."
        def on_train_begin(self, args, state, control, **kw): self.t0, self.steps = time.perf_counter(), []
        def on_step_end(self, args, state, control, **kw): self.steps.append(time.perf_counter())
        def on_train_end(self, args, state, control, **kw): self.t1 = time.perf_counter()
    return StepClock()

def _train_summary(spec, clock, n_steps, extra):
    bs = spec['batch_size']
    total = clock.t1 - clock.t0
    half = len(clock.steps) // 2
    steady = (clock.steps[-1] - clock.steps[half - 1]) / (len(clock.steps) - half) if half else float('nan')
    return dict(samples_per_s=n_steps * bs / total, steady_samples_per_s=bs / steady, seconds=total, steps=n_steps,
                first_step_s=clock.steps[0] - clock.t0, **extra)

def work_train(spec) -> dict:
    "One training run of `spec['arm']` ('cer_nb', 'cer_nb-unshared' or 'trl'): throughput, memory."
    _setup_worker(spec)
    from cer_nb.core import LABEL_SETS
    from cer_nb.model import load_lvlm, lora_config
    train, labels, px = _train_rows(spec), LABEL_SETS[spec['labels']], spec['px']
    dtype = 'bfloat16' if spec['device'] == 'cuda' else 'float32'
    work = Path(tempfile.mkdtemp(prefix='cer_nb_bench_'))
    clock, rss0 = _step_clock(), None
    try:
        if spec['arm'].startswith('cer_nb'):
            from cer_nb.train import StageConfig, train_stage
            from cer_nb.runs import read_run_info
            shared = spec['arm'] == 'cer_nb'  # cer_nb-unshared: the same prompt, every row running all of it
            cfg = StageConfig(spec['base'], labels=spec['labels'], stage='bench', image_size=px, max_pixels=spec['max_pixels'],
                              max_steps=spec['steps'], batch_size=spec['batch_size'], lr=spec['lr'], dtype=dtype, variant=spec['variant'],
                              layout=spec['layout'], share_prefix=shared,
                              save_steps=10**6, logging_steps=10, seed=spec['seed'])
            rss0 = rss_mb()
            run = train_stage(cfg, train, work/'run', progress=False, callbacks=[clock])
            info = read_run_info(run)
            extra = dict(final_loss=info['metrics']['train_loss'])
        else:
            from datasets import Dataset, Image as HFImage, List
            from trl import SFTConfig, SFTTrainer
            from cer_nb.prompts import chat_messages
            from transformers import set_seed
            set_seed(spec['seed'])
            lo = stage_lora()
            ds = Dataset.from_dict({'images': [[p] for p in train.path],
                                    'messages': [chat_messages(labels, spec['variant'], answer=l, layout=spec['layout']) for l in train.label]})
            ds = ds.cast_column('images', List(HFImage()))
            model, processor = load_lvlm(spec['base'], dtype=dtype, max_pixels=spec['max_pixels'])
            # the settings train_stage uses; SFTConfig's own defaults would also turn on gradient checkpointing and bf16
            args = SFTConfig(output_dir=str(work/'trl'), per_device_train_batch_size=spec['batch_size'], learning_rate=spec['lr'],
                             max_steps=spec['steps'], lr_scheduler_type='cosine', warmup_steps=0.03, weight_decay=0.0,
                             logging_steps=10, save_strategy='no', seed=spec['seed'], report_to=[], max_length=None,
                             gradient_checkpointing=False, bf16=dtype == 'bfloat16', dataloader_num_workers=0,
                             dataloader_pin_memory=spec['device'] == 'cuda', disable_tqdm=True)
            rss0 = rss_mb()
            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                                 peft_config=lora_config(model, lo['preset'], r=lo['r'], alpha=lo['alpha'], dropout=lo['dropout']), callbacks=[clock])
            out = trainer.train()
            extra = dict(final_loss=out.training_loss)
        res = _train_summary(spec, clock, spec['steps'], extra)
        res.update(peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0, peak_gpu_mb=_gpu_peak_mb(spec))
        if spec.get('flops'): res.update(_mfu(spec, res))
        return res
    finally: shutil.rmtree(work, ignore_errors=True)

def _mfu(spec, res) -> dict:
    "Model FLOPs utilisation of the measured steady-state steps (GPU runs)."
    import torch
    from transformers import AutoConfig
    from cer_nb.core import LABEL_SETS
    from cer_nb.lvlm import load_processor
    from cer_nb.model import AnswerCollator
    import pandas as pd
    cfg = AutoConfig.from_pretrained(spec['base'])
    proc = load_processor(spec['base'], max_pixels=spec['max_pixels'])
    rows = pd.read_csv(spec['train_csv']).iloc[:spec['batch_size']]
    b = AnswerCollator(proc, LABEL_SETS[spec['labels']], image_size=spec['px'])([{'image': p, 'answer': l} for p, l in zip(rows.path, rows.label)])
    n_tok, seq = int(b['attention_mask'].sum()), b['input_ids'].shape[1]
    n_patch = int(b['pixel_values'].shape[0])
    flops = train_step_flops(cfg, n_tok, n_patch, logit_positions=n_tok, seq_len=seq, patches_per_image=n_patch // spec['batch_size'])
    achieved = flops * res['steady_samples_per_s'] / spec['batch_size']
    peak = spec.get('peak_tflops') or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(0)), None)
    return dict(step_tflop=flops / 1e12, achieved_tflops=achieved / 1e12, peak_tflops=peak, mfu=achieved / (peak * 1e12) if peak else None)

def _load_faces(csv, n=None):
    import pandas as pd
    from PIL import Image
    df = pd.read_csv(csv)
    if n: df = df.iloc[:n]
    return [Image.open(p).convert('RGB') for p in df.path], list(df.label)

def _label_set(key):
    from cer_nb.core import LABEL_SETS, LabelSet, RAFDB_BASIC, RAFDB_COMPOUND
    if key == 'compound+basic': return LabelSet('compound+basic', tuple(RAFDB_COMPOUND) + tuple(RAFDB_BASIC))
    return LABEL_SETS[key]

def work_eval(spec) -> dict:
    "Classify the test split with `spec['arm']` ('score', 'score-unshared', 'generate', or a floor): images/s, accuracy, unparseable rate, passes, memory."
    _setup_worker(spec)
    import torch
    from cer_nb.core import find_label
    from cer_nb.infer import load_checkpoint, label_logprobs, generate_answers, prompt_batch, _shared_cache
    from cer_nb.model import shared_prefix, positions, cache_kwarg, per_token_keys
    from cer_nb.lvlm import load_processor
    faces, truth = _load_faces(spec['test_csv'], spec.get('n_test'))
    labels = _label_set(spec['labels'])
    model, processor, info = load_checkpoint(spec['run'], device=spec['device'])
    if spec['max_pixels']: processor = load_processor(info['base_model'], max_pixels=spec['max_pixels'])  # more visual tokens at larger px
    kw = dict(variant=spec['variant'], image_size=spec['px'], layout=spec['layout'])  # the prompt the adapter was trained on (2b: the base itself)
    rss0, bs, passes = rss_mb(), spec['batch_size'], []
    model.register_forward_pre_hook(lambda *_: passes.append(1))  # every forward pass of the model, whichever arm
    def classify(batch):
        if spec['arm'].startswith('score'):
            lp = label_logprobs(model, processor, batch, labels, share=spec['arm'] == 'score', **kw)
            return [labels[i] for i in lp.argmax(-1).tolist()]
        if spec['arm'] == 'floor':  # what a reader that does not share the prefix must do: prepare the batch, run the whole prompt once
            with torch.no_grad(): model(**prompt_batch(model, processor, batch, labels, **kw), use_cache=True, logits_to_keep=1)
            return [None] * len(batch)
        if spec['arm'] == 'floor-face':  # only the per-face work: each face's tokens on top of the prefix, computed once for the evaluation
            b = prompt_batch(model, processor, batch, labels, **kw)
            P, pos = shared_prefix(model, b), positions(model, b)
            rest = {k: (v[:, P:] if k in ('input_ids', *per_token_keys(b)) else v) for k, v in b.items()}
            if pos is not None: rest['position_ids'] = pos[..., P:]
            with torch.no_grad(): model(**rest, **{cache_kwarg(model): _shared_cache(model, b, P, pos)}, use_cache=True, logits_to_keep=1)
            return [None] * len(batch)
        return [find_label(a, labels) for a in generate_answers(model, processor, batch, labels, **kw)]
    classify(faces[:bs])  # warm-up
    passes.clear()
    if spec['device'] == 'cuda': torch.cuda.synchronize()
    t0, preds = time.perf_counter(), []
    for i in range(0, len(faces), bs): preds += classify(faces[i:i + bs])
    if spec['device'] == 'cuda': torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    floor = spec['arm'].startswith('floor')  # reads no answer: no accuracy
    acc = None if floor else sum(p == t for p, t in zip(preds, truth)) / len(truth)
    return dict(images_per_s=len(faces) / dt, seconds=dt, n_images=len(faces), accuracy=acc,
                unparseable_rate=None if floor else sum(p is None for p in preds) / len(preds), n_labels=len(labels),
                passes_per_batch=len(passes) / math.ceil(len(faces) / bs),  # forward passes of the model per batch
                peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0, peak_gpu_mb=_gpu_peak_mb(spec))

def work_predict(spec) -> dict:
    "`predict` on a loaded model: median latency for one image, and throughput for a batch of paths."
    _setup_worker(spec)
    import pandas as pd
    from cer_nb.infer import predict
    paths = list(pd.read_csv(spec['test_csv']).path)
    kw = dict(method=spec['arm'], device=spec['device'])
    predict(paths[0], spec['run'], **kw)  # loads and caches the model
    rss0, lat = rss_mb(), []
    for p in paths[1:1 + spec['latency_reps']]:
        t = time.perf_counter(); predict(p, spec['run'], **kw); lat.append(time.perf_counter() - t)
    batch = paths[:spec['n_batch']]
    t = time.perf_counter(); preds = predict(batch, spec['run'], batch_size=spec['batch_size'], **kw); dt = time.perf_counter() - t
    assert len(preds) == len(batch)
    return dict(latency_ms=1000 * statistics.median(lat), latency_p90_ms=1000 * sorted(lat)[int(0.9 * (len(lat) - 1))],
                batch_images_per_s=len(batch) / dt, n_batch=len(batch), peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0,
                peak_gpu_mb=_gpu_peak_mb(spec))

def work_adapter(spec) -> dict:
    "Train (once) the adapter the evaluation uses: compound LoRA from the base, cer_nb's CPU preset."
    import torch
    torch.set_num_threads(spec['threads'])
    import pandas as pd
    from cer_nb.train import StageConfig, train_stage, PRESETS
    from cer_nb.runs import read_run_info
    preset = PRESETS['cpu-tiny'] if spec['device'] == 'cpu' else dict(dtype='bfloat16', batch_size=spec['batch_size'])
    cfg = StageConfig(spec['base'], labels='rafdb_compound', stage='bench-adapter', max_steps=spec['steps'], save_steps=10**6,
                      layout=spec['layout'], variant=spec['variant'], **preset)
    run = train_stage(cfg, pd.read_csv(spec['train_csv']), spec['run'], progress=False)
    return dict(run=str(run), metrics=read_run_info(run)['metrics'])

WORKERS = {'train': work_train, 'eval': work_eval, 'predict': work_predict, 'adapter': work_adapter}

class WorkerFailed(RuntimeError):
    "A measuring process that exited with an error; `reason`: the error's last line."
    def __init__(self, spec:dict, code:int, stderr:str):
        self.reason = next((l.strip() for l in reversed(stderr.splitlines()) if l.strip()), f'exit {code}, no message')
        super().__init__(f"worker {spec['kind']}/{spec.get('arm')} failed (exit {code}):\n{stderr[-4000:]}")

def run_worker(spec:dict, timeout:int=1800) -> dict:
    "Run one measurement in a fresh Python process; its result, with the load average around it."
    env = {**os.environ, 'OMP_NUM_THREADS': str(spec['threads']), 'MKL_NUM_THREADS': str(spec['threads']),
           'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_VERBOSITY': 'error', 'PYTHONWARNINGS': 'ignore'}
    load0 = os.getloadavg()[0]
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--worker', json.dumps(spec)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
    if p.returncode or not lines: raise WorkerFailed(spec, p.returncode, p.stderr)
    return {**json.loads(lines[-1][7:]), 'load_before': round(load0, 2), 'load_after': round(os.getloadavg()[0], 2)}

# ----------------------------------------------------------------------------------------------------------------
# The run: interleaved trials, medians, ratios

OPTIONAL_ARMS = ('trl',)  # arms that may not support every family: one that fails is reported and left out, not fatal

def interleaved(name:str, specs:dict, trials:int, rows:list, skipped:dict, x=None, log=print):
    "Run `trials` rounds of every arm in `specs`, the order reversed every other round (A, B, B, A, ...); append a row per run."
    for t in range(trials):
        for arm, spec in (specs.items() if t % 2 == 0 else reversed(list(specs.items()))):  # alternate who goes first
            if arm in skipped: continue
            try: res = run_worker(spec)
            except WorkerFailed as e:
                if arm not in OPTIONAL_ARMS: raise
                skipped[arm] = f"failed on {spec['family']} ({spec['base']}): {e.reason}"
                log(f"  {name:<18} {arm:<9} NOT SUPPORTED here, left out of the rest of the run: {skipped[arm]}")
                continue
            rows.append(dict(experiment=name, arm=arm, trial=t, x_name=x[0] if x else None, x=x[1] if x else None, **res))
            log(f"  {name:<18} {arm:<9} {'' if not x else f'{x[0]}={x[1]}':<14} trial {t}: " +
                ', '.join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float) and k in METRIC_KEYS))

METRIC_KEYS = ('samples_per_s', 'steady_samples_per_s', 'images_per_s', 'accuracy', 'unparseable_rate', 'passes_per_batch', 'latency_ms',
               'batch_images_per_s', 'peak_rss_mb', 'peak_gpu_mb', 'mfu')

def summarise(rows:list) -> list:
    "Median of every metric per (experiment, arm, x)."
    groups = {}
    for r in rows: groups.setdefault((r['experiment'], r['arm'], r['x_name'], r['x']), []).append(r)
    out = []
    for (exp, arm, xn, x), rs in groups.items():
        s = dict(experiment=exp, arm=arm, x_name=xn, x=x, trials=len(rs))
        for k in METRIC_KEYS + ('seconds', 'final_loss', 'load_before', 'load_after'):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals: s[k] = statistics.median(vals)
        out.append(s)
    return out

def ratios(summary:list) -> list:
    "cer_nb's speed over the alternative's, for every experiment and x (medians)."
    pairs = {'2b': [('cer_nb', 'cer_nb-unshared', 'steady_samples_per_s'), ('score', 'score-unshared', 'images_per_s')],
             'train': [('cer_nb', 'trl', 'samples_per_s'), ('cer_nb', 'cer_nb-unshared', 'samples_per_s')],
             'eval': [('score', 'generate', 'images_per_s'), ('score', 'score-unshared', 'images_per_s'), ('score', 'floor-face', 'images_per_s')]}
    out, by = [], {(s['experiment'], s['arm'], s['x']): s for s in summary}
    for s in summary:
        kind = s['experiment'].split('/')[0]
        for a, b, k in pairs.get(kind, []):
            other = by.get((s['experiment'], b, s['x']))
            if s['arm'] != a or not (other and other.get(k)): continue
            out.append(dict(experiment=s['experiment'], x_name=s['x_name'], x=s['x'], faster=a, slower=b, metric=k, ratio=s[k] / other[k]))
            if s.get('steady_samples_per_s') and other.get('steady_samples_per_s'): out[-1]['steady_ratio'] = s['steady_samples_per_s'] / other['steady_samples_per_s']
    return out

def print_table(summary, rats):
    cols = ['experiment', 'arm', 'x', 'trials', 'samples_per_s', 'steady_samples_per_s', 'images_per_s', 'accuracy',
            'unparseable_rate', 'passes_per_batch', 'latency_ms', 'batch_images_per_s', 'peak_rss_mb', 'peak_gpu_mb', 'mfu']
    cols = [c for c in cols if any(s.get(c) is not None for s in summary)]
    fmt = lambda v: '' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v))
    table = [[fmt(s.get(c)) for c in cols] for s in summary]
    w = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    print('  '.join(c.ljust(w[i]) for i, c in enumerate(cols)))
    for r in table: print('  '.join(v.ljust(w[i]) for i, v in enumerate(r)))
    print()
    for r in rats:
        x = '' if r['x'] is None else f"{r['x_name']}={r['x']}"
        print(f"{r['experiment']:<22} {x:<24} {r['faster']} / {r['slower']} {r['metric']}: {r['ratio']:.2f}x")

def main(argv=None):
    from cer_nb.lvlm import FAMILIES
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help="a smoke run (SIZES['quick']): one trial, few steps and faces, no scaling unless --only names it")
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--family', default=DEFAULT_FAMILY, choices=list(FAMILIES),
                   help=f"model family (config.model_type): {DEFAULT_FAMILY} runs the shipped pre-trained tiny model, "
                        "any other its tiny replica (random weights)")
    p.add_argument('--model-size', default='tiny', choices=['tiny', '2b'],
                   help="'tiny': see --family; '2b': a Qwen2-VL-2B-Instruct replica, random weights (--family qwen2_vl; for a GPU)")
    p.add_argument('--threads', type=int, default=1, help='torch threads in every measuring process (same for all arms)')
    p.add_argument('--trials', type=int, default=None, help='interleaved trials per arm (default: SIZES, 5; quick 1)')
    p.add_argument('--steps', type=int, default=None, help='optimiser steps per training run (default: SIZES, 70 = 2 epochs; quick 6)')
    p.add_argument('--batch-size', type=int, default=16, help='training batch size (cer_nb cpu-tiny preset: 16)')
    p.add_argument('--eval-batch-size', type=int, default=8, help='faces per forward pass when evaluating')
    p.add_argument('--layout', default='context-first', choices=['context-first', 'image-first'], help='prompt layout of every arm (cer_nb.prompts.LAYOUTS)')
    p.add_argument('--variant', default='context', choices=['bare', 'options', 'context', 'cues'], help='prompt variant of every arm, but the prompt-length scaling')
    p.add_argument('--adapter-steps', type=int, default=None, help='steps of the adapter the evaluation uses (default: SIZES, 250; quick 4)')
    p.add_argument('--only', default=None, help='comma-separated parts to run, of train,eval,predict,scaling (default: SIZES, all; quick all but scaling)')
    p.add_argument('--work', default=os.path.join(tempfile.gettempdir(), 'cer_nb_bench'), help='cache of data, replicas and adapters')
    p.add_argument('--out', default=str(HERE/'results'), help='folder of the JSON results')
    p.add_argument('--tag', default=None, help='result file name (default: from the machine, family and size)')
    p.add_argument('--peak-tflops', type=float, default=None, help='GPU peak bf16 TFLOP/s for MFU (default: from the GPU name)')
    p.add_argument('--check-2b', action='store_true', help='only build the 2B config on the meta device and count parameters')
    p.add_argument('--allow-dirty', action='store_true', help="measure although cer_nb's code differs from its git commit; the result file then says so")
    p.add_argument('--worker', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        print('RESULT ' + json.dumps(WORKERS[spec['kind']](spec), default=str), flush=True)
        return
    if a.check_2b:
        print(json.dumps(count_2b_params(), indent=1)); return
    if a.model_size == '2b' and a.family != DEFAULT_FAMILY:
        p.error(f"--model-size 2b is Qwen2-VL-2B-Instruct ({DEFAULT_FAMILY}); other families run as --model-size tiny replicas")
    import torch
    from transformers.utils import logging as hf_logging
    from cer_nb.core import write_json
    hf_logging.disable_progress_bar()  # a replica's save_pretrained
    if a.device == 'cuda' and not torch.cuda.is_available(): sys.exit('--device cuda: no CUDA GPU here')
    z = SIZES['quick' if a.quick else 'full']
    trials, steps, adapter_steps = a.trials or z['trials'], a.steps or z['steps'], a.adapter_steps or z['adapter_steps']
    parts = set((a.only or z['parts']).split(','))
    if parts - PARTS: p.error(f"--only {a.only}: unknown part(s) {', '.join(sorted(parts - PARTS))}; expected some of {', '.join(sorted(PARTS))}")
    from cer_nb.runs import DirtyTreeError
    try: info = machine_info(a.device, a.allow_dirty)
    except DirtyTreeError as e: sys.exit(f"{e} (here: --allow-dirty)")
    tag = a.tag or machine_tag(info, a.family, '2b' if parts == {'2b'} else a.model_size, a.quick)
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    print(f"cer_nb benchmark -> {tag}: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if info['gpu'] else ''}; "
          f"load {load_start[0]:.2f}; torch threads {a.threads}; {trials} trials, {steps} steps" +
          (f"; QUICK: a smoke run ({adapter_steps}-step adapter), not numbers to quote" if a.quick else ''), flush=True)
    csvs = prepare_data(work, z['resolutions'])
    model_info = base_model(a.family, a.model_size, work)
    random_note = '; accuracies mean nothing, speed and memory are what is measured' if model_info['random_weights'] else ''
    print(f"{a.family} ({a.model_size}): {model_info['weights']}{random_note}", flush=True)
    common = dict(device=a.device, threads=a.threads, family=a.family, base=model_info['base'], seed=0, labels='rafdb_compound',
                  max_pixels=image_max_pixels(a.family, 100), layout=a.layout, variant=a.variant)
    flops = a.device == 'cuda' and a.family == DEFAULT_FAMILY  # `train_step_flops` counts Qwen2-VL's layers
    train_spec = dict(common, kind='train', train_csv=csvs['train_100'], px=100, steps=steps, batch_size=a.batch_size,
                      lr=3e-3 if a.device == 'cpu' else 2e-4, flops=flops, peak_tflops=a.peak_tflops)
    rows, skipped = [], {}
    def measure(name, spec, arms, rounds=1, x=None, **kw):
        "`rounds` interleaved runs of `spec`, with `kw`, for each of `arms`, into `rows`."
        interleaved(name, {arm: dict(spec, arm=arm, **kw) for arm in arms}, rounds, rows, skipped, x)
    train_arms, eval_arms = ('cer_nb', 'cer_nb-unshared', 'trl'), ('score', 'score-unshared', 'generate')
    if 'train' in parts:
        print('training throughput (one stage):', flush=True)
        measure('train', train_spec, train_arms, trials)
    need_run = parts & {'eval', 'predict', 'scaling'}
    run = work/f'adapter-{a.family}-{a.model_size}-{a.device}-{a.layout}-{a.variant}-{adapter_steps}'
    adapter = run_worker(dict(common, kind='adapter', train_csv=csvs['train_100'],
                              steps=adapter_steps, batch_size=a.batch_size, run=str(run))) if need_run else None
    eval_spec = dict(common, kind='eval', run=str(run), test_csv=csvs['test_100'], px=100, batch_size=a.eval_batch_size, n_test=z['n_test'])
    if 'eval' in parts:
        print('evaluation (label scoring vs generate-and-parse; floor: the whole prompt per face; floor-face: the per-face part alone):', flush=True)
        measure('eval', eval_spec, (*eval_arms, 'floor', 'floor-face'), trials)
    if 'predict' in parts:
        print('predict on a loaded model:', flush=True)
        pspec = dict(common, kind='predict', run=str(run), test_csv=csvs['test_100'], batch_size=a.eval_batch_size,
                     latency_reps=z['latency_reps'], n_batch=z['n_batch'])
        measure('predict', pspec, ('score', 'generate'), trials)
    if 'scaling' in parts:
        print('scaling:', flush=True)
        n_test = z['n_scaling_test']
        for n in z['n_train']:  # one epoch over n faces: the stage's cost grows with the data
            measure('train/dataset_size', train_spec, train_arms, x=('n_train', n), n_train=n, steps=n // a.batch_size)
        for px in z['resolutions']:  # visual tokens grow with px only where the family's cap is a pixel count (`image_max_pixels`)
            measure('train/resolution', train_spec, train_arms, x=('px', px), train_csv=csvs[f'train_{px}'], px=px,
                    max_pixels=image_max_pixels(a.family, px), steps=min(steps, z['resolution_steps']))
        for px in z['resolutions']:
            measure('eval/resolution', eval_spec, eval_arms, x=('px', px), test_csv=csvs[f'test_{px}'], px=px,
                    max_pixels=image_max_pixels(a.family, px), n_test=n_test)
        for key in ('abaw_compound', 'rafdb_compound', 'compound+basic'):
            measure('eval/n_labels', eval_spec, eval_arms, x=('labels', key), labels=key, n_test=n_test)
        for n in z['n_eval']:
            measure('eval/dataset_size', eval_spec, eval_arms, x=('n_test', n), n_test=n)
        for bs in (1, 8, 32):
            measure('eval/batch_size', eval_spec, eval_arms, x=('batch_size', bs), n_test=n_test, batch_size=bs)
        for v in ('bare', 'options', 'context', 'cues'):  # the adapter learnt the --variant prompt: accuracies of the others mean little
            measure('eval/prompt', eval_spec, eval_arms, x=('variant', v), variant=v, n_test=n_test)
            measure('train/prompt', train_spec, train_arms, x=('variant', v), variant=v, steps=min(steps, z['resolution_steps']))
    if '2b' in parts:  # the real-dimension replica, random weights: one trial of a few steps and faces, one process at a time
        big = base_model(DEFAULT_FAMILY, '2b', work)
        print(f"Qwen2-VL-2B replica ({big['weights']}):", flush=True)
        bspec = dict(common, family=DEFAULT_FAMILY, base=big['base'], max_pixels=image_max_pixels(DEFAULT_FAMILY, 100), flops=flops, peak_tflops=a.peak_tflops)
        measure('2b/train', dict(bspec, kind='train', train_csv=csvs['train_100'], px=100, steps=z['steps_2b'], batch_size=2,
                                 lr=2e-4), ('cer_nb', 'cer_nb-unshared'))
        measure('2b/eval', dict(bspec, kind='eval', run=big['base'], test_csv=csvs['test_100'], px=100, batch_size=a.eval_batch_size,
                                n_test=z['n_test_2b']), ('score', 'score-unshared'))
    summary = summarise(rows)
    rats = ratios(summary)
    result = dict(schema=SCHEMA, tag=tag, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  command='python benchmarks/bench.py ' + ' '.join(sys.argv[1:] if argv is None else argv), quick=a.quick,
                  machine=info, load_avg_start=list(load_start), load_avg_end=list(os.getloadavg()),
                  wall_seconds=round(time.time() - t_start, 1),
                  settings=dict(device=a.device, family=a.family, model_size=a.model_size, **model_info,
                                threads=a.threads, trials=trials, steps=steps, batch_size=a.batch_size, eval_batch_size=a.eval_batch_size,
                                layout=a.layout, variant=a.variant,
                                adapter_steps=adapter_steps, lora=stage_lora(),
                                data='synthetic RAF-DB compound (cer_nb.synth, seed 0): 560 train / 140 test, aligned 100x100',
                                memory='peak resident set size of each measuring process (ru_maxrss, MB), includes Python, torch and the model'),
                  skipped=skipped, adapter=adapter, check_2b=count_2b_params(), rows=rows, summary=summary, ratios=rats)
    out = Path(a.out)/f'{tag}.json'
    write_json(result, out, indent=1)
    print()
    print_table(summary, rats)
    for arm, why in skipped.items(): print(f"{arm}: not measured, {why}")
    if model_info['random_weights']: print(f"{a.family} ({a.model_size}): {model_info['weights']}{random_note}")
    print(f"\nwrote {out} ({result['wall_seconds']:.0f} s; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f})")

if __name__ == '__main__': main()
