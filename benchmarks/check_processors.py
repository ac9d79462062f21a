"""Stock vs image-only processors: do they feed the model the same thing?

On a machine with torchvision (Colab, GPU machines) cer_nb loads transformers' stock processor; without it
(CI, the CPU machines this project is built on) it builds an image-only processor from the family's PIL image
processor, the tokenizer and the chat template. This script checks, for every supported family, that the two
give the same model inputs and the same label scores on the same images.

For each family in `cer_nb.lvlm.FAMILIES` (only `qwen2_vl` where that module is missing) it builds the family's
tiny random replica (`cer_nb.replicas.make_tiny_replica`, when that module exists) and also checks the tiny model
shipped in `cer_nb/assets`. Each side runs in its own fresh process of this interpreter, loading the same folder:

- stock: `load_processor(folder)` as it is (torchvision importable, so `AutoProcessor` builds the stock processor
  with its torchvision image and video processors);
- image-only: the same call in a process where torchvision is hidden before anything is imported
  (`sys.modules['torchvision'] = None`, so `importlib.util.find_spec('torchvision')` is None,
  `transformers.utils.is_torchvision_available()` is False and `import torchvision` raises): cer_nb takes its
  no-torchvision path exactly as on a machine without torchvision.

Compared on each image (several sizes, 100×100 and non-square ones among them): `input_ids` and every per-token
input (`attention_mask`, `mm_token_type_ids`, `token_type_ids`, ...) identical, every other integer input
(`image_grid_thw`, `image_sizes`, masks, ...) identical, the max abs difference of the float (pixel) inputs, and
`cer_nb.infer.label_logprobs` on the same model (max abs difference, same argmax). The training batch
(`AnswerCollator`) is compared the same way. A control: how much the stock scores vary across the images — where
they do not vary at all, the model ignores the image and the score comparison shows nothing.

Needs torchvision (e.g. `pip install torch==2.14.1 torchvision==0.29.1` in its own venv, then
`pip install -e ".[dev]"`). Usage, from the repository root:

    python benchmarks/check_processors.py            # writes nbs/results/processor_check.json and prints a table

Random-weight replicas: their scores mean nothing as predictions; only the stock/image-only differences matter.
"""
from __future__ import annotations
import argparse, importlib.util, json, os, platform, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT/'nbs'/'results'/'processor_check.json'
HIDE_TORCHVISION = "sys.modules['torchvision'] = None, set before anything is imported in the image-only process"
IMAGES = [('photo 100x100', 'photo', (100, 100)), ('photo 224x224', 'photo', (224, 224)),
          ('photo 160x96 (landscape)', 'photo', (160, 96)), ('photo 72x128 (portrait, small)', 'photo', (72, 128)),
          ('photo 448x448 (downscaled)', 'photo', (448, 448)), ('synthetic face 100x100', 'synthetic', (100, 100))]  # (name, source, (width, height))

# ----------------------------------------------------------------------------------------------------------------
# The parent: build the folders, run both sides, compare

def make_images(folder:Path) -> list[dict]:
    "The test images, saved losslessly (PNG) so both processes read the same pixels."
    from PIL import Image, ImageOps
    import matplotlib.cbook
    from cer_nb.synth import render_faces
    photo = Image.open(matplotlib.cbook.get_sample_data('grace_hopper.jpg')).convert('RGB')
    face = render_faces(['Happily Surprised'], seed=0, size=100)[0][0]
    out = []
    for i, (name, source, size) in enumerate(IMAGES):
        img = ImageOps.fit(photo, size, Image.Resampling.BICUBIC) if source == 'photo' else face.resize(size)
        path = folder/f'{i}.png'; img.save(path)
        out.append(dict(name=name, path=str(path), size=list(size)))
    return out

def _missing_video_config(folder:Path) -> bool:
    "Whether `folder` holds no video processor settings (nested in processor_config.json or in a file of its own)."
    cfg = folder/'processor_config.json'
    nested = cfg.exists() and 'video_processor' in json.loads(cfg.read_text())
    return not (nested or (folder/'video_preprocessor_config.json').exists() or (folder/'preprocessor_config.json').exists())

def asset_rows(work:Path) -> list[dict]:
    "The shipped tiny model as shipped, and, if it lacks video processor settings, a copy with the proposed fix."
    from cer_nb.pretrain import tiny_base
    asset = Path(tiny_base())
    rows = [dict(name='qwen2_vl: shipped tiny model', model_type='qwen2_vl', path=str(asset), source='cer_nb/assets as shipped')]
    if _missing_video_config(asset):
        fixed = work/'asset-fixed'; shutil.copytree(asset, fixed)
        cfg = json.loads((fixed/'processor_config.json').read_text())
        cfg['video_processor'] = {'video_processor_type': 'Qwen2VLVideoProcessor'}
        (fixed/'processor_config.json').write_text(json.dumps(cfg, indent=2))
        rows.append(dict(name='qwen2_vl: shipped tiny model + fix', model_type='qwen2_vl', path=str(fixed),
                         source="copy of cer_nb/assets with processor_config.json['video_processor'] = "
                                "{'video_processor_type': 'Qwen2VLVideoProcessor'} added"))
    return rows

def families() -> dict:
    "family name -> its model types: from `cer_nb.lvlm.FAMILIES` where that module exists, else only qwen2_vl."
    if importlib.util.find_spec('cer_nb.lvlm') is None: return {'qwen2_vl': ['qwen2_vl']}
    from cer_nb.lvlm import FAMILIES
    return {name: [name] for name in FAMILIES}  # a family's key is its model type

def replica_rows(work:Path) -> list[dict]:
    "One tiny random replica per supported model type (none where `cer_nb.replicas` does not exist yet)."
    if importlib.util.find_spec('cer_nb.replicas') is None: return []
    from cer_nb.replicas import make_tiny_replica
    rows = []
    for fam, types in families().items():
        for mt in types:
            row = dict(name=f'{mt}: tiny replica', family=fam, model_type=mt, source='cer_nb.replicas.make_tiny_replica(seed=0)')
            try: row['path'] = str(make_tiny_replica(mt, work/mt, seed=0))
            except Exception as e: row['error'] = f'building the replica: {type(e).__name__}: {e}'
            rows.append(row)
    return rows

def run_side(side:str, spec:Path, out:Path) -> dict:
    "Run one side in a fresh process of this interpreter; its results."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    p = subprocess.run([sys.executable, __file__, '--worker', side, str(spec), str(out)], env=env, capture_output=True, text=True)
    if p.returncode: raise RuntimeError(f'the {side} process failed (exit {p.returncode}):\n{p.stderr[-3000:]}')
    import torch
    return torch.load(out, weights_only=False)

def _group(key:str, v, ids) -> str:
    "Which comparison `key` belongs to."
    if key == 'input_ids': return 'input_ids'
    if ids is not None and tuple(v.shape) == tuple(ids.shape): return 'per_token'
    return 'float' if v.is_floating_point() else 'integer'

def compare_inputs(a:dict, b:dict) -> dict:
    "Compare two processor outputs key by key: integer inputs exactly, float inputs by max abs difference."
    keys, ids = sorted(set(a) | set(b)), a.get('input_ids')
    out = dict(missing=[k for k in keys if (k in a) != (k in b)], input_ids=None, per_token={}, integer={}, float={})
    for k in keys:
        if k not in a or k not in b: continue
        x, y = a[k], b[k]
        g = _group(k, x, ids)
        if tuple(x.shape) != tuple(y.shape): res = f'shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}'
        elif g == 'float':
            d = (x.double() - y.double()).abs()
            res = dict(max_abs=float(d.max()), mean_abs=float(d.mean()), frac_differ=float((d > 1e-6).double().mean())) if d.numel() else dict(max_abs=0.0, mean_abs=0.0, frac_differ=0.0)
        else: res = bool((x == y).all())
        if g == 'input_ids': out['input_ids'] = res
        else: out[g][k] = res
    return out

def _same(v) -> bool: return v is True

def _top2_gap(scores) -> float:
    "How far the best label's score is ahead of the second's."
    top = scores.double().topk(2).values
    return float(top[0] - top[1])

def compare_row(stock:dict, image_only:dict, images:list[dict]) -> dict:
    "Per-image comparisons of one folder's two sides, and their summary."
    import torch
    per_image, s = [], dict(input_ids=True, per_token=True, integer=True, keys_missing=[], shape_mismatch=[], float_max_abs=0.0,
                            float_mean_abs=0.0, float_frac_differ=0.0, score_max_abs=0.0, argmax_same=0, argmax_flips=[],
                            prompt_batch_same_ints=None, prompt_batch_float_max_abs=None,
                            training_batch_same_ints=None, training_batch_float_max_abs=None)
    for im, a, b in zip(images, stock['images'], image_only['images']):
        c = dict(image=im['name'], processor=compare_inputs(a['inputs'], b['inputs']))
        sa, sb = a['scores'], b['scores']
        if sa is not None and sb is not None:
            c.update(score_max_abs=float((sa.double() - sb.double()).abs().max()), argmax=[int(sa.argmax()), int(sb.argmax())],
                     top2_gap=[_top2_gap(sa), _top2_gap(sb)], scores_stock=sa.tolist(), scores_image_only=sb.tolist())
        p = c['processor']
        s['input_ids'] &= _same(p['input_ids'])
        s['per_token'] &= all(_same(v) for v in p['per_token'].values())
        s['integer'] &= all(_same(v) for v in p['integer'].values())
        s['keys_missing'] = sorted(set(s['keys_missing']) | set(p['missing']))
        for k, v in p['float'].items():
            if isinstance(v, str): s['shape_mismatch'].append(f"{im['name']}: {k}: {v}"); continue
            s['float_max_abs'] = max(s['float_max_abs'], v['max_abs'])
            s['float_mean_abs'] = max(s['float_mean_abs'], v['mean_abs'])
            s['float_frac_differ'] = max(s['float_frac_differ'], v['frac_differ'])
        for key in ('prompt_batch', 'training_batch'):
            if a.get(key) is None or b.get(key) is None: continue
            pb = c[key] = compare_inputs(a[key], b[key])
            ints = _same(pb['input_ids']) and not pb['missing'] and all(_same(v) for v in [*pb['per_token'].values(), *pb['integer'].values()])
            s[f'{key}_same_ints'] = ints if s[f'{key}_same_ints'] is None else s[f'{key}_same_ints'] and ints
            fb = [v['max_abs'] if isinstance(v, dict) else float('inf') for v in pb['float'].values()]
            s[f'{key}_float_max_abs'] = max([s[f'{key}_float_max_abs'] or 0.0, *fb])
        per_image.append(c)
        if 'argmax' not in c: continue
        s['score_max_abs'] = max(s['score_max_abs'], c['score_max_abs'])
        if c['argmax'][0] == c['argmax'][1]: s['argmax_same'] += 1
        else: s['argmax_flips'].append(dict(image=im['name'], top2_gap_stock=c['top2_gap'][0], score_max_abs=c['score_max_abs']))
    s['n_images'], s['n_scored'] = len(per_image), sum('argmax' in c for c in per_image)
    scored = [torch.tensor(c['scores_stock']) for c in per_image if 'argmax' in c]
    # negative control: a score comparison means something only where the scores depend on the image at all
    s['scores_vary_across_images'] = max((float((x - scored[0]).abs().max()) for x in scored), default=None)
    s['score_error'] = {side: x['score_error'] for side, x in (('stock', stock), ('image_only', image_only)) if 'score_error' in x} or None
    first = stock['images'][0]['inputs'] if per_image else {}
    s['keys'] = {k: _group(k, v, first.get('input_ids')) for k, v in first.items()}
    grey = stock.get('grey_level')
    s['float_max_abs_grey_levels'] = round(s['float_max_abs'] / grey, 2) if grey else None
    s['same_weights'] = stock.get('weights_sum') == image_only.get('weights_sum')
    s['pixel_table'] = dict(stock=stock.get('pixel_table'), image_only=image_only.get('pixel_table'))
    s['integer_inputs_identical'] = bool(s['input_ids'] and s['per_token'] and s['integer'] and not s['keys_missing'] and not s['shape_mismatch'])
    return dict(summary=s, images=per_image)

def _versions() -> dict:
    import torch, transformers
    tv = importlib.util.find_spec('torchvision')
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                torchvision=__import__('torchvision').__version__ if tv else None, **_needed_versions())

def _needed_versions() -> dict:
    "Versions of the extra packages the families' processors import (`Family.needs`), None where missing."
    import importlib.metadata as md
    try: from cer_nb.lvlm import FAMILIES
    except ImportError: return {}
    out = {}
    for pkg in sorted({n for f in FAMILIES.values() for n in f.needs}):
        try: out[pkg] = md.version(pkg)
        except md.PackageNotFoundError: out[pkg] = None
    return out

def _fmt(v, nd=4) -> str:
    if isinstance(v, bool): return 'same' if v else 'DIFFER'
    if isinstance(v, float): return f'{v:.{nd}g}' if v else '0'
    return str(v)

def table(rows:list[dict]) -> str:
    "The summary table, one line per checked folder."
    head = ['checked', 'stock processor / image processor', 'image-only processor / image processor', 'images', 'input_ids',
            'per-token', 'grid/size', 'pixels max|Δ| (grey levels)', 'pixels differing', 'training batch: ids+labels / pixels max|Δ|',
            'scores max|Δ| (nats)', 'control: scores vary across images (nats)', 'same argmax']
    lines = [head]
    for r in rows:
        if 'error' in r: lines.append([r['name'], 'ERROR: ' + r['error'].splitlines()[0][:150]] + [''] * (len(head) - 2)); continue
        s, cls = r['summary'], r['classes']
        px = _fmt(s['float_max_abs']) + (f" ({s['float_max_abs_grey_levels']})" if s['float_max_abs_grey_levels'] is not None else '')
        flips = ''.join(f"; {f['image']}: top-2 gap {f['top2_gap_stock']:.2g}" for f in s['argmax_flips'])
        unscored = [c['image'] for c in r['images'] if 'argmax' not in c]
        if unscored and s['n_scored']:
            flips += f"; not scored: {', '.join(unscored)} (" + '; '.join(f'{k}: {v[:60]}' for k, v in s['score_error'].items()) + ')'
        lines.append([r['name'], f"{cls['stock']['processor']} / {cls['stock']['image_processor']}",
                      f"{cls['image_only']['processor']} / {cls['image_only']['image_processor']}", str(s['n_images']),
                      _fmt(s['input_ids']), _fmt(s['per_token']), _fmt(s['integer'] and not s['keys_missing'] and not s['shape_mismatch']),
                      px, f"{s['float_frac_differ']:.1%}", f"{_fmt(s['training_batch_same_ints'])} / {_fmt(s['training_batch_float_max_abs'])}",
                      *((_fmt(s['score_max_abs'], 3), _fmt(s['scores_vary_across_images'], 3) + ('' if s['scores_vary_across_images'] else ' (images ignored)'),
                         f"{s['argmax_same']}/{s['n_scored']}{flips}") if s['n_scored'] else
                        ('ERROR: ' + '; '.join(f'{k}: {v[:90]}' for k, v in s['score_error'].items()), '', ''))])
    w = [max(len(l[i]) for l in lines if len(l) > i) for i in range(len(head))]
    md = ['| ' + ' | '.join(c.ljust(w[i]) for i, c in enumerate(l)) + ' |' for l in lines]
    return '\n'.join([md[0], '|' + '|'.join('-' * (x + 2) for x in w) + '|', *md[1:]])

def main(out:Path=RESULT, keep:Path|None=None, allow_dirty:bool=False):
    if importlib.util.find_spec('torchvision') is None:
        sys.exit('check_processors needs torchvision (the stock side); install it in its own venv: '
                 'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[dev]"')
    from cer_nb.core import write_json
    from cer_nb.runs import require_clean, DirtyTreeError
    try: prov = require_clean(allow_dirty, 'the processor check', ROOT)  # commit, changed files, code fingerprint
    except DirtyTreeError as e: sys.exit(f"{e} (here: --allow-dirty)")
    t0 = time.time()
    work = Path(keep or tempfile.mkdtemp(prefix='check_processors_')); work.mkdir(parents=True, exist_ok=True)
    images = make_images(work)
    rows = asset_rows(work) + replica_rows(work)
    spec = work/'spec.json'
    spec.write_text(json.dumps(dict(images=images, rows=[r for r in rows if 'error' not in r])))
    sides = {side: run_side(side, spec, work/f'{side}.pt') for side in ('stock', 'image-only')}
    for r in rows:
        if 'error' in r: continue
        a, b = sides['stock'][r['name']], sides['image-only'][r['name']]
        r['classes'] = dict(stock=a.get('classes'), image_only=b.get('classes'))
        r['torchvision_seen'] = dict(stock=a.get('torchvision_seen'), image_only=b.get('torchvision_seen'))
        err = [f"{side}: {x['error']}" for side, x in (('stock', a), ('image-only', b)) if 'error' in x]
        if err: r['error'] = '; '.join(err); continue
        r.update(compare_row(a, b, images))
    result = dict(what='stock (torchvision) vs image-only (no torchvision) processor of each family, same folder, same images, same model',
                  how_image_only_was_forced=HIDE_TORCHVISION, command='python benchmarks/check_processors.py',
                  synthetic_note='replicas have random weights: their scores mean nothing as predictions; only the differences matter',
                  labels='rafdb_compound', images=[dict(name=i['name'], size=i['size']) for i in images],
                  **{**prov, 'versions': {**prov['versions'], **_versions()}}, platform=platform.platform(), seconds=round(time.time() - t0, 1), rows=rows)
    write_json(result, out)
    print(f'stock processor: torchvision importable; image-only: {HIDE_TORCHVISION}')
    print(table(rows))
    print(f"\n{sum(r.get('summary', {}).get('integer_inputs_identical', False) for r in rows)}/{len(rows)} with identical integer inputs; {result['seconds']} s; "
          f"torch {result['versions']['torch']}, torchvision {result['versions']['torchvision']}, transformers {result['versions']['transformers']}; "
          f"commit {result['git_commit']}{' (dirty)' if result['git_dirty'] else ''}; written {out}")
    if not keep: shutil.rmtree(work, ignore_errors=True)
    return result

# ----------------------------------------------------------------------------------------------------------------
# A worker: one side, every folder

def _render(processor, family) -> str:
    "The prompt text for one face, as cer_nb renders it."
    from cer_nb.core import RAFDB_COMPOUND
    from cer_nb.prompts import chat_messages, prompt_text
    if getattr(family, 'prompt_only', False) or not processor.chat_template: return prompt_text(RAFDB_COMPOUND)
    return processor.apply_chat_template(chat_messages(RAFDB_COMPOUND), add_generation_prompt=True, tokenize=False)

def _classes(proc) -> dict:
    vp = getattr(proc, 'video_processor', None)
    return dict(processor=type(proc).__name__, image_processor=type(proc.image_processor).__name__,
                video_processor=type(vp).__name__ if vp is not None else None)

def _grey_level(image_processor) -> float|None:
    "One 8-bit grey level in the normalised pixel units of `image_processor` (its smallest step), if it normalises."
    std, factor = getattr(image_processor, 'image_std', None), getattr(image_processor, 'rescale_factor', None)
    if not std or not factor: return None
    return factor / max(std) if getattr(image_processor, 'do_normalize', True) else factor

def worker_row(row:dict, images:list) -> dict:
    import torch
    from cer_nb.core import RAFDB_COMPOUND
    from cer_nb import infer
    from cer_nb.lvlm import family_of
    from cer_nb.model import AnswerCollator, load_lvlm
    family = family_of(row['path'])
    model, proc = load_lvlm(row['path'], dtype='float32')  # as cer_nb loads it: the image cap applied to processor and model
    res = dict(classes=_classes(proc), grey_level=_grey_level(proc.image_processor),
               weights_sum=float(sum(p.detach().double().sum() for p in model.parameters())), images=[])
    text = _render(proc, family)
    with torch.no_grad():
        for img in images:
            inputs = {k: v for k, v in proc(text=[text], images=[img], return_tensors='pt').items() if torch.is_tensor(v)}
            try: batch = {k: v.cpu() for k, v in infer.prompt_batch(model, proc, [img], RAFDB_COMPOUND).items() if torch.is_tensor(v)}
            except Exception as e: batch, res['prompt_batch_error'] = None, f'{type(e).__name__}: {e}'
            try:
                collate = AnswerCollator(proc, labels=RAFDB_COMPOUND)
                train = {k: v for k, v in collate([dict(image=img, answer=RAFDB_COMPOUND.labels[0])]).items() if torch.is_tensor(v)}
                res['pixel_table'] = collate.table is not None  # 8-bit pixels + lookup table, where exact
            except Exception as e: train, res['training_batch_error'] = None, f'{type(e).__name__}: {e}'
            try: scores = infer.label_logprobs(model, proc, [img], RAFDB_COMPOUND)[0]
            except Exception as e: scores, res['score_error'] = None, f'{type(e).__name__}: {e}'; res['score_traceback'] = traceback.format_exc()
            res['images'].append(dict(inputs=inputs, prompt_batch=batch, training_batch=train, scores=scores))
    return res

def worker(side:str, spec_file:str, out_file:str):
    if side == 'image-only': sys.modules['torchvision'] = None  # before any import: cer_nb and transformers see no torchvision
    import torch
    from PIL import Image
    torch.set_num_threads(1)
    from transformers.utils import is_torchvision_available
    seen = dict(find_spec=importlib.util.find_spec('torchvision') is not None, transformers=is_torchvision_available())
    if side == 'image-only' and any(seen.values()): raise RuntimeError(f'torchvision is still visible: {seen}')
    spec = json.loads(Path(spec_file).read_text())
    images = [Image.open(i['path']).convert('RGB') for i in spec['images']]
    out = {}
    for row in spec['rows']:
        try: out[row['name']] = worker_row(row, images)
        except Exception as e: out[row['name']] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
        out[row['name']]['torchvision_seen'] = seen
    torch.save(out, out_file)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', type=Path, default=RESULT, help=f'result JSON (default {RESULT.relative_to(ROOT)})')
    p.add_argument('--keep', type=Path, default=None, help='keep the replicas, images and raw outputs in this folder')
    p.add_argument('--allow-dirty', action='store_true', help="run although cer_nb's code differs from its git commit; the result then says so")
    p.add_argument('--worker', nargs=3, metavar=('SIDE', 'SPEC', 'OUT'), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker: worker(*a.worker)
    else: main(a.out, a.keep, a.allow_dirty)
