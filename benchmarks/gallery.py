"""Web-scale galleries: NCL biases from embeddings and serving from a FAISS index.

    python benchmarks/gallery.py sparse  --workdir DIR [--bank 1000000 --gallery 100000 --top_k 128]
                                         [--search ivf|exact]
    python benchmarks/gallery.py dense   --workdir DIR [--bank 200000 --gallery 20000 --passes 4]
    python benchmarks/gallery.py bank_groups --workdir DIR [--bank 100000 --gallery 10000
                                         --devices 2 --passes 4]
    python benchmarks/gallery.py serving --workdir DIR [--gallery 100000 --queries 10000]
    python benchmarks/gallery.py sparse_processes --workdir DIR [--bank 200000 --gallery 20000
                                         --processes 2]
    python benchmarks/gallery.py truth   --workdir DIR [--bank 100000 --gallery 10000 --passes 80]

Data: clustered synthetic embeddings (D = 256 by default) with Zipf-popular concepts and hubs
(:func:`make_data`): items carry varying amounts of one direction that every query also
carries, so some items score high for every query and plain cosine ranking over-retrieves them.
Bank and held-out queries pick an item uniformly at random and perturb it, so NCL's uniform
target is the truth, and each held-out query's target item is known (R@1).

* ``sparse``: ``ncl_jax.gallery.solve.sparse_biases`` on bank x gallery from memory-mapped files,
  in a fresh process (wall time, peak RSS, the worst-case and the sampled certified error,
  omitted-mass bound), then R@1 of the
  held-out queries, plain vs NCL (searched through flat indexes); with ``--dense_check``, one
  untimed dense pass under the solved biases gives the dense problem's true column error, the
  quantity both certificates bound.
* ``dense``: ``dense_biases`` from embeddings vs the existing streamed similarity-matrix path
  (``normalize.streamed_ncl_biases``) given its bank x gallery matrix precomputed and
  memory-mapped; both run the same Anderson iteration, timed over ``--passes`` passes each,
  each in a fresh process for its peak RSS. Then (unless ``--no_solve``) the exact biases to
  tol 1e-4 and sparse mode with the exact and the ivf search on the same data: held-out top-1
  agreement with the exact biases, R@1.
* ``bank_groups``: dense mode on ``--devices`` CPU devices as one bank group (the gallery split
  over the devices, each streaming the whole bank) and as ``--devices`` groups (each streaming
  its share of the bank against the whole gallery, one all-reduce of the column sums per pass):
  seconds per pass, the all-reduce alone, and the biases' difference.
* ``sparse_processes``: sparse mode in one process and split over ``--processes``
  jax.distributed processes on this machine (each searching and holding its block of the
  bank's rows): wall time and each process's peak RSS.
* ``truth``: at a size where dense passes are affordable, how far the sparse biases are from
  solving the dense problem (its true column error, against both certificates), how well 10,000
  sampled rows estimate the column-sum difference, and the dense passes that reach a column
  error of 1e-2 from the sparse biases and from zero (:func:`run_truth`).
* ``serving``: ``index`` kinds flat and ivf (one build, nprobe = nlist/128 ... nlist/8; hnsw too
  with ``--hnsw``) at ``--gallery`` items with biases of scale 2 logits: build time, queries/s
  (batches of 4,096), recall@10 against the exact (flat) NCL ranking.

Every result is one JSON line on stdout with the machine's load average before and after; data
files are generated once per ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_ROWS = 65536


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _load():
  return [round(v, 2) for v in os.getloadavg()]


def _peak_rss_gb() -> float:
  """This process's peak RSS (VmHWM). Unlike ru_maxrss, it restarts at exec, so a worker does
  not inherit the peak of the process that started it."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 2 ** 20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# -- data ----------------------------------------------------------------------------------------


def make_data(folder: pathlib.Path, n_bank: int, n_items: int, n_heldout: int, dim: int,
              args, seed: int = 0) -> dict:
  """Writes gallery.npy, bank.npy, heldout.npy and heldout_target.npy (once per folder).

  Items: ``unit(c_k + spread n_j / sqrt(D) + h_j m)`` with ``k`` a Zipf-popular concept (20
  items per concept on average), ``h_j ~ U(0, hub)`` and ``m`` one direction shared by all.
  Queries of item ``j``: ``unit(c_k + spread n_j / sqrt(D) + query_noise e / sqrt(D) +
  query_shift m)``: the query
  side carries ``m`` too (a modality gap), so ``q . v_j`` gains an item offset ``~ h_j`` that
  says nothing about relevance: items with large ``h_j`` are hubs.
  """
  folder.mkdir(parents=True, exist_ok=True)
  paths = {name: folder / f"{name}.npy" for name in ("gallery", "bank", "heldout",
                                                      "heldout_target")}
  if all(p.exists() for p in paths.values()):
    return paths
  rng = np.random.default_rng(seed)
  n_concepts = max(1, n_items // 20)
  popularity = 1.0 / np.arange(1, n_concepts + 1) ** 1.1
  concept = rng.choice(n_concepts, n_items, p=popularity / popularity.sum())
  centres = _unit(rng.normal(size=(n_concepts, dim)))
  shared = _unit(rng.normal(size=(1, dim)))[0]
  content = (centres[concept] + rng.normal(size=(n_items, dim)) * (args.spread / np.sqrt(dim))
             ).astype(np.float32)
  np.save(paths["gallery"], _unit(content + rng.uniform(0, args.hub, n_items)[:, None] * shared))

  def queries(path, n):
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    targets = rng.integers(0, n_items, n)
    for start in range(0, n, _ROWS):
      t = targets[start:start + _ROWS]
      noise = rng.normal(size=(len(t), dim)).astype(np.float32) * (args.query_noise / np.sqrt(dim))
      out[start:start + len(t)] = _unit(content[t] + noise + args.query_shift * shared)
    out.flush()
    return targets

  queries(paths["bank"], n_bank)
  np.save(paths["heldout_target"], queries(paths["heldout"], n_heldout))
  return paths


# -- workers (each in a fresh process, for its own peak RSS) ----------------------------------------


def _worker(job: dict) -> dict:
  from ncl_jax import normalize  # pylint: disable=g-import-not-at-top
  from ncl_jax.gallery import solve  # pylint: disable=g-import-not-at-top
  if job.get("coordinator"):   # one of several jax.distributed processes on this machine
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=job["coordinator"],
                               num_processes=job["num_processes"], process_id=job["process_id"])
  bank = np.load(job["bank"], mmap_mode="r")
  progress = (lambda line: print(line, file=sys.stderr, flush=True)) if job.get("verbose") else None
  start = time.monotonic()
  if job["kind"] == "dense_check":
    return _dense_check(job)
  if job["kind"] == "peer":  # the existing path: a precomputed, memory-mapped matrix
    sims = np.load(job["sims"], mmap_mode="r")
    out = normalize.streamed_ncl_biases(sims, temperature=job["temperature"], tol=job["tol"],
                                        max_iterations=job["max_iterations"])
    result = {"iterations": out.iterations, "error": out.error, "passes": out.iterations + 1}
    bias = out.bias
  else:
    gallery = np.load(job["gallery"], mmap_mode="r")
    options = dict(temperature=job["temperature"], tol=job["tol"],
                   max_iterations=job["max_iterations"], progress=progress)
    if job["kind"] == "sparse":
      out = solve.sparse_biases(bank, gallery, top_k=job["top_k"], search=job["search"],
                                nlist=job.get("nlist"), nprobe=job.get("nprobe"), **options)
    else:
      out = solve.dense_biases(bank, gallery, bank_groups=job.get("bank_groups", 1), **options)
    result = out.report()
    if job.get("time_all_reduce"):
      result["all_reduce_seconds"] = _time_group_sum(job.get("bank_groups", 1), len(gallery))
    bias = out.bias
  result.update(seconds=time.monotonic() - start, peak_rss_gb=_peak_rss_gb())
  if not job.get("process_id"):   # process 0 (or the only one) writes the biases
    np.save(job["out"], bias)
  return result


def _dense_check(job: dict) -> dict:
  """One dense pass (exact column sums from the embeddings) under saved biases: the dense
  problem's true relative L1 column error, which every certificate bounds from above."""
  from ncl_jax import streaming  # pylint: disable=g-import-not-at-top
  from ncl_jax.gallery import dense  # pylint: disable=g-import-not-at-top
  bank = np.load(job["bank"], mmap_mode="r")
  gallery = np.load(job["gallery"], mmap_mode="r")
  bias = np.load(job["biases"])
  start = time.monotonic()
  column_mass = dense.DenseColumnMass(bank, gallery, 1.0 / job["temperature"], dense.make_mesh(1))
  colsum = np.asarray(column_mass(bias), np.float64)
  b = streaming.balanced_marginals(None, bank.shape[0], gallery.shape[0])
  return {"dense_error": streaming.column_error(colsum, b),
          "seconds": time.monotonic() - start, "peak_rss_gb": _peak_rss_gb()}


def _time_group_sum(groups: int, n_items: int, repeats: int = 20) -> float:
  """Seconds of one all-reduce of the column sums over the bank groups (what a pass adds)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ncl_jax.gallery import dense  # pylint: disable=g-import-not-at-top
  mesh = dense.make_mesh(groups)
  padded = -(-n_items // mesh.devices.shape[1]) * mesh.devices.shape[1]
  totals = jax.device_put(np.ones((groups, padded), np.float32),
                          NamedSharding(mesh, P(dense.BANK_AXIS, dense.GALLERY_AXIS)))
  reduce = dense._group_sum(mesh)  # pylint: disable=protected-access
  reduce(totals).block_until_ready()
  start = time.monotonic()
  for _ in range(repeats):
    reduce(totals).block_until_ready()
  return (time.monotonic() - start) / repeats


def _run_worker(job: dict, devices: int | None = None) -> dict:
  before = _load()
  env = dict(os.environ)
  if devices:   # CPU devices for a mesh on this machine
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}").strip()
  # The worker's progress lines and errors go straight to this process's stderr.
  proc = subprocess.run([sys.executable, __file__, "_worker", json.dumps(job)], cwd=REPO,
                        stdout=subprocess.PIPE, text=True, check=False, env=env)
  if proc.returncode:
    raise SystemExit(f"worker {job['kind']} failed (exit {proc.returncode}); see stderr")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["load"] = {"before": before, "after": _load()}
  return result


def _run_processes(job: dict, processes: int) -> list[dict]:
  """``job`` in ``processes`` jax.distributed worker processes on this machine (one CPU device
  each, the coordinator on a free local port); each one's result."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  before = _load()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, __file__, "_worker", json.dumps(dict(
          job, coordinator=f"localhost:{port}", num_processes=processes, process_id=i,
          verbose=job.get("verbose") and i == 0))],
      cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) for i in range(processes)]
  outputs = [proc.communicate()[0] for proc in procs]
  if any(proc.returncode for proc in procs):
    raise SystemExit(f"a worker failed (exits {[proc.returncode for proc in procs]}); see stderr")
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  for result in results:
    result["load"] = {"before": before, "after": _load()}
  return results


# -- evaluation ----------------------------------------------------------------------------------


def _top1(paths, bias, temperature):
  from ncl_jax.gallery import index as index_lib  # pylint: disable=g-import-not-at-top
  gallery = np.load(paths["gallery"], mmap_mode="r")
  index = index_lib.BiasedIndex.build(gallery, bias, temperature=temperature)
  return index.search(np.load(paths["heldout"]), 1)[0][:, 0]


def _r1(paths, bias, temperature) -> float:
  return float(np.mean(_top1(paths, bias, temperature) == np.load(paths["heldout_target"])) * 100)


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def run_sparse(args) -> None:
  paths = make_data(pathlib.Path(args.workdir) / f"sparse_{args.bank}x{args.gallery}", args.bank,
                    args.gallery, args.heldout, args.dim, args)
  job = dict(kind="sparse", bank=str(paths["bank"]), gallery=str(paths["gallery"]),
             temperature=args.temperature, tol=args.tol, max_iterations=args.max_iterations,
             top_k=args.top_k, search=args.search, nlist=args.nlist, nprobe=args.nprobe,
             out=str(pathlib.Path(args.workdir) / f"sparse_biases_{args.search}.npy"),
             verbose=True)
  result = _run_worker(job)
  bias = np.load(job["out"])
  zeros = np.zeros_like(bias)
  result.update(section="sparse", bank=args.bank, gallery=args.gallery, dim=args.dim,
                r1_plain=_r1(paths, zeros, 1.0), r1_ncl=_r1(paths, bias, args.temperature),
                heldout=args.heldout)
  if args.dense_check:   # untimed: after the run, in its own process
    result["dense_check"] = _run_worker(dict(kind="dense_check", bank=job["bank"],
                                             gallery=job["gallery"], biases=job["out"],
                                             temperature=args.temperature))
  _emit(result)


def _write_sims(paths, out: pathlib.Path) -> float:
  """The peer's input: bank @ gallery.T as a float32 .npy on disk; returns seconds."""
  if out.exists():
    return 0.0
  start = time.monotonic()
  bank = np.load(paths["bank"], mmap_mode="r")
  gallery = np.load(paths["gallery"])
  partial = out.with_suffix(".partial.npy")
  sims = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                   shape=(bank.shape[0], gallery.shape[0]))
  for first in range(0, bank.shape[0], 4096):
    sims[first:first + 4096] = np.asarray(bank[first:first + 4096]) @ gallery.T
  sims.flush()
  del sims
  partial.rename(out)
  return time.monotonic() - start


def run_sparse_processes(args) -> None:
  """Sparse mode in one process and with the bank's rows split over ``--processes``
  jax.distributed processes (one CPU device each): each process searches and holds only its
  block of rows. Wall time and every process's peak RSS; the biases' largest difference and
  held-out top-1 agreement. With ``--search exact`` both solve the same sparse problem; with
  ivf a query's scanned lists depend on the other queries in its scan batch, so splitting the
  bank changes the search a little."""
  root = pathlib.Path(args.workdir)
  paths = make_data(root / f"sparse_{args.bank}x{args.gallery}", args.bank, args.gallery,
                    args.heldout, args.dim, args)
  job = dict(kind="sparse", bank=str(paths["bank"]), gallery=str(paths["gallery"]),
             temperature=args.temperature, tol=args.tol, max_iterations=args.max_iterations,
             top_k=args.top_k, search=args.search, nlist=args.nlist, nprobe=args.nprobe)
  one = _run_worker(dict(job, out=str(root / "processes_1.npy")))
  split = _run_processes(dict(job, out=str(root / f"processes_{args.processes}.npy")),
                         args.processes)
  biases = [np.load(root / f"processes_{n}.npy") for n in (1, args.processes)]
  _emit({"section": "sparse_processes", "bank": args.bank, "gallery": args.gallery,
         "dim": args.dim, "top_k": args.top_k, "search": args.search, "one_process": one,
         "processes": args.processes, "split": split,
         "max_bias_difference": float(np.abs((biases[0] - biases[0].mean())
                                             - (biases[1] - biases[1].mean())).max()),
         "heldout_top1_agreement_percent": float(np.mean(
             _top1(paths, biases[0], args.temperature)
             == _top1(paths, biases[1], args.temperature)) * 100)})


def _sampled_column_difference(bank, gallery, found, bias, scale, rows):
  """The mean over ``rows`` of ``P_i - S_i`` [Ng] (true softmax row minus the solved plan's
  row, float64): an unbiased estimate of the column-sum difference over the whole bank."""
  from ncl_jax.gallery import sparse  # pylint: disable=g-import-not-at-top
  total = np.zeros(gallery.shape[0])
  for _, true, plan, _ in sparse.true_and_plan_rows(bank, gallery, found, bias, scale, rows):
    total += (true - plan).sum(axis=0)
  return total / len(rows)


def _dense_passes_to(column_mass, b, start, passes: int, target: float):
  """Dense Anderson passes from biases ``start``: (the first pass whose column error is at most
  ``target``, or None; every pass's error)."""
  from ncl_jax import streaming  # pylint: disable=g-import-not-at-top
  errors = []

  def recorded(g):
    colsum = np.asarray(column_mass(g), np.float64)
    errors.append(streaming.column_error(colsum, b))
    return colsum

  streaming.column_fixed_point(recorded, b, tol=target, max_iterations=passes - 1,
                               initial=start)
  return next((i + 1 for i, e in enumerate(errors) if e <= target), None), errors


def run_truth(args) -> None:
  """How far sparse biases are from solving the dense problem, at a size where dense passes
  are affordable: the sparse solve (``--search``, ``--top_k``; the steps of
  ``solve.sparse_biases``, to keep its search result), then with exact column sums from the
  embeddings: the dense problem's true column error under the sparse biases, the sampled and
  worst-case certificates, how well 10,000 sampled rows estimate the column-sum difference
  vector, and the dense passes needed to reach a column error of 1e-2 from the sparse biases
  and from zero (up to ``--passes``). One process, not timed."""
  from ncl_jax import streaming  # pylint: disable=g-import-not-at-top
  from ncl_jax.gallery import dense, search, sparse  # pylint: disable=g-import-not-at-top
  paths = make_data(pathlib.Path(args.workdir) / f"sparse_{args.bank}x{args.gallery}", args.bank,
                    args.gallery, args.heldout, args.dim, args)
  before = _load()
  bank = np.load(paths["bank"], mmap_mode="r")
  gallery = np.load(paths["gallery"])
  scale = 1.0 / args.temperature
  found = search.top_k_items(bank, gallery, args.top_k, search=args.search,
                             temperature=args.temperature)
  plan = sparse.SparsePlan(found.scores, found.index, found.omitted_level, len(gallery), scale)
  b = streaming.balanced_marginals(None, len(bank), len(gallery))
  solved = streaming.column_fixed_point(plan, b, tol=args.tol, max_iterations=args.max_iterations)
  worst = sparse.worst_case_gap(bank, found, solved.bias, scale, len(gallery),
                                sparse.score_error(bank, gallery))
  sampled = sparse.sampled_gap(bank, gallery, found, solved.bias, scale, 10_000, 0.999, 0)
  column_mass = dense.DenseColumnMass(bank, gallery, scale, dense.make_mesh(1))
  difference = (np.asarray(column_mass(solved.bias), np.float64) - plan(solved.bias)) / len(bank)
  estimate = _sampled_column_difference(bank, gallery, found, solved.bias, scale,
                                        sparse.sample_rows(len(bank), 10_000, 0))
  warm, warm_errors = _dense_passes_to(column_mass, b, solved.bias, args.passes, 1e-2)
  cold, cold_errors = _dense_passes_to(column_mass, b, None, args.passes, 1e-2)
  _emit({"section": "truth", "bank": args.bank, "gallery": args.gallery, "dim": args.dim,
         "top_k": args.top_k, "search": args.search, "temperature": args.temperature,
         "sparse_error": solved.error, "dense_error": warm_errors[0],
         "sampled_certified_error": solved.error + sampled.gap,
         "certified_error": solved.error + worst.gap,
         "column_difference_l1": float(np.abs(difference).sum()),
         "sampled_column_difference_l1_error": float(np.abs(estimate - difference).sum()),
         "dense_passes_to_1e-2_from_sparse": warm, "dense_passes_to_1e-2_from_zero": cold,
         "dense_errors_from_sparse": warm_errors, "dense_errors_from_zero": cold_errors,
         "load": {"before": before, "after": _load()}})


def run_dense(args) -> None:
  root = pathlib.Path(args.workdir)
  paths = make_data(root / f"dense_{args.bank}x{args.gallery}", args.bank, args.gallery,
                    args.heldout, args.dim, args)
  sims_path = root / f"dense_{args.bank}x{args.gallery}" / "sims.npy"
  matrix_seconds = _write_sims(paths, sims_path)
  common = dict(bank=str(paths["bank"]), gallery=str(paths["gallery"]),
                temperature=args.temperature, tol=0.0, max_iterations=args.passes - 1)
  dense = _run_worker(dict(common, kind="dense", out=str(root / "dense_fixed.npy")))
  peer = _run_worker(dict(common, kind="peer", sims=str(sims_path), out=str(root / "peer.npy")))
  _emit({"section": "dense_vs_peer", "bank": args.bank, "gallery": args.gallery,
         "dim": args.dim, "passes": args.passes, "dense": dense, "peer": peer,
         "peer_matrix_gb": sims_path.stat().st_size / 2 ** 30,
         "peer_matrix_seconds": matrix_seconds,
         "time_ratio_peer_over_dense": peer["seconds"] / dense["seconds"],
         "rss_ratio_peer_over_dense": peer["peak_rss_gb"] / dense["peak_rss_gb"],
         "max_bias_difference": float(np.abs(
             (np.load(root / "dense_fixed.npy") - np.load(root / "dense_fixed.npy").mean())
             - (np.load(root / "peer.npy") - np.load(root / "peer.npy").mean())).max())})
  if args.no_solve:
    return
  # The exact biases to agree with: the streamed matrix path to tol 1e-4 (the same problem and
  # iteration as dense mode, tested equal; it reuses the matrix already on disk, ~8x cheaper
  # per pass here than recomputing it).
  exact = _run_worker(dict(common, kind="peer", sims=str(sims_path), tol=1e-4,
                           max_iterations=args.max_iterations, out=str(root / "exact.npy")))
  exact_bias = np.load(root / "exact.npy")
  top_exact = _top1(paths, exact_bias, args.temperature)
  targets = np.load(paths["heldout_target"])
  record = {"section": "sparse_agreement_with_exact", "bank": args.bank, "gallery": args.gallery,
            "top_k": args.top_k, "exact": exact,
            "r1_plain": _r1(paths, np.zeros_like(exact_bias), 1.0),
            "r1_exact": float(np.mean(top_exact == targets) * 100)}
  for search in ("exact", "ivf"):
    out = root / f"sparse_{search}_on_dense.npy"
    sparse = _run_worker(dict(common, kind="sparse", tol=args.tol, top_k=args.top_k,
                              search=search, max_iterations=args.max_iterations, out=str(out)))
    top_sparse = _top1(paths, np.load(out), args.temperature)
    record[f"sparse_{search}"] = dict(
        sparse, top1_agreement_percent=float(np.mean(top_exact == top_sparse) * 100),
        r1=float(np.mean(top_sparse == targets) * 100))
  _emit(record)


def run_bank_groups(args) -> None:
  """Dense mode on ``--devices`` CPU devices as 1 bank group (the gallery split over all of
  them) and as ``--devices`` groups (the bank split, the gallery whole on each): the same
  passes, timed in fresh processes, plus the per-pass all-reduce of the column sums alone."""
  root = pathlib.Path(args.workdir)
  paths = make_data(root / f"dense_{args.bank}x{args.gallery}", args.bank, args.gallery,
                    args.heldout, args.dim, args)
  common = dict(kind="dense", bank=str(paths["bank"]), gallery=str(paths["gallery"]),
                temperature=args.temperature, tol=0.0, max_iterations=args.passes - 1,
                time_all_reduce=True)
  runs = {}
  for groups in (1, args.devices):
    out = root / f"bank_groups_{groups}.npy"
    runs[groups] = _run_worker(dict(common, bank_groups=groups, out=str(out)),
                               devices=args.devices)
    runs[groups]["seconds_per_pass"] = runs[groups]["seconds"] / runs[groups]["passes"]
  biases = [np.load(root / f"bank_groups_{g}.npy") for g in (1, args.devices)]
  _emit({"section": "bank_groups", "bank": args.bank, "gallery": args.gallery, "dim": args.dim,
         "devices": args.devices, "passes": args.passes,
         "runs": {str(g): r for g, r in runs.items()},
         "max_bias_difference": float(np.abs((biases[0] - biases[0].mean())
                                             - (biases[1] - biases[1].mean())).max())})


def run_serving(args) -> None:
  from ncl_jax.gallery import index as index_lib  # pylint: disable=g-import-not-at-top
  paths = make_data(pathlib.Path(args.workdir) / f"serving_{args.gallery}", args.gallery,
                    args.gallery, args.queries, args.dim, args)
  gallery = np.load(paths["gallery"])
  queries = np.load(paths["heldout"])
  bias = np.random.default_rng(1).normal(scale=2.0, size=len(gallery)).astype(np.float32)
  kinds = ["flat", "ivf"] + (["hnsw"] if args.hnsw else [])
  exact = None
  for kind in kinds:
    before = _load()
    start = time.monotonic()
    index = index_lib.BiasedIndex.build(gallery, bias, temperature=args.temperature, kind=kind)
    build = time.monotonic() - start
    settings = [{}]
    if kind == "ivf":  # one build, several search widths
      nlist = index.manifest["params"]["nlist"]
      settings = [{"nprobe": max(1, nlist // d)} for d in (128, 64, 32, 8)]
    for setting in settings:
      index.set_search_parameters(**setting)
      start = time.monotonic()
      found, _ = index.search(queries, 10)
      seconds = time.monotonic() - start
      exact = found if kind == "flat" else exact
      recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
      _emit({"section": "serving", "kind": kind, "gallery": len(gallery),
             "queries": len(queries), "params": index.manifest["params"],
             "build_seconds": build, "queries_per_second": len(queries) / seconds,
             "recall_at_10": float(recall), "load": {"before": before, "after": _load()}})


def main() -> None:
  if sys.argv[1] == "_worker":
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("section", choices=("sparse", "dense", "bank_groups", "serving", "truth",
                                          "sparse_processes"))
  parser.add_argument("--workdir", required=True, help="data and results folder (reused)")
  parser.add_argument("--bank", type=int, help="bank queries")
  parser.add_argument("--gallery", type=int, help="gallery items")
  parser.add_argument("--heldout", type=int, default=10000, help="held-out queries (R@1)")
  parser.add_argument("--queries", type=int, default=10000, help="serving: queries")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--top_k", type=int, default=128)
  parser.add_argument("--search", choices=("exact", "ivf"), default="ivf",
                      help="sparse: the top-k search (ivf: inverted lists, default settings)")
  parser.add_argument("--nlist", type=int, help="sparse --search ivf: lists")
  parser.add_argument("--nprobe", type=int, help="sparse --search ivf: lists scanned")
  parser.add_argument("--temperature", type=float, default=0.02)
  parser.add_argument("--spread", type=float, default=0.6, help="items around their concept")
  parser.add_argument("--hub", type=float, default=0.8, help="items' shared-direction range")
  parser.add_argument("--query_noise", type=float, default=0.8, help="query noise around items")
  parser.add_argument("--query_shift", type=float, default=0.8, help="queries' shared direction")
  parser.add_argument("--tol", type=float, default=1e-3)
  parser.add_argument("--max_iterations", type=int, default=200)
  parser.add_argument("--passes", type=int, default=4,
                      help="dense: passes timed per method; truth: most dense passes (80)")
  parser.add_argument("--no_solve", action="store_true", help="dense: timing comparison only")
  parser.add_argument("--dense_check", action="store_true",
                      help="sparse: then one dense pass under the solved biases (2 Nb Ng D FLOP, "
                           "untimed): the dense problem's true column error")
  parser.add_argument("--hnsw", action="store_true", help="serving: also an hnsw index")
  parser.add_argument("--devices", type=int, default=2,
                      help="bank_groups: CPU devices (1 group of them vs this many groups)")
  parser.add_argument("--processes", type=int, default=2,
                      help="sparse_processes: processes to split the bank's rows over")
  args = parser.parse_args()
  defaults = {"sparse": (1_000_000, 100_000), "dense": (200_000, 20_000),
              "truth": (100_000, 10_000), "sparse_processes": (200_000, 20_000),
              "bank_groups": (100_000, 10_000), "serving": (None, 100_000)}[args.section]
  args.bank = args.bank or defaults[0]
  args.gallery = args.gallery or defaults[1]
  if args.section == "truth" and args.passes == 4:   # its own default: passes to 1e-2
    args.passes = 80
  {"sparse": run_sparse, "dense": run_dense, "bank_groups": run_bank_groups,
   "serving": run_serving, "truth": run_truth,
   "sparse_processes": run_sparse_processes}[args.section](args)


if __name__ == "__main__":
  main()
