#!/usr/bin/env python3
"""CPU A/B on a shared machine (docs/perf.md, issue 11): several builds or SIMD targets run in
interleaved rounds (each round runs every configuration once, the order rotating), then medians.

  bench/cpu_ab.py attention ROUNDS CONFIG... -- [cca bench attention flags]
  bench/cpu_ab.py model ROUNDS THREADS_CSV CONFIG...

CONFIG is 'label=[VAR=value ...] path/to/cca [extra flags]', e.g.
  'avx2=CCA_CPU_TARGET=avx2 build/cca' or 'old=old/cca --reps 1'.
attention: `cca bench attention --json`; prints ms, GFLOP/s and GFLOP per CPU-second
(GFLOP/s / cores_busy: the rate of a core while the process runs, which other load on the
machine does not dilute) per configuration, variant and T.
model: `cca bench model --prompt 16384 -n 32 --variants full,cca --repeat 1 --threads T --json`
(random Llama, 4 layers, hidden 256); prints prefill seconds and decode tokens/s."""
import json
import os
import statistics
import subprocess
import sys


def run(cmd, argv):
    env = dict(os.environ)
    parts = cmd.split()
    while '=' in parts[0]:
        k, v = parts.pop(0).split('=', 1)
        env[k] = v
    out = subprocess.run([parts[0]] + argv + parts[1:], env=env, capture_output=True, text=True,
                         check=True).stdout
    return out.strip().splitlines()


def rotations(specs, rounds):
    for r in range(rounds):
        yield r, specs[r % len(specs):] + specs[:r % len(specs)]


def attention(rounds, specs, common):
    res = {}
    for r, order in rotations(specs, rounds):
        for label, cmd in order:
            for line in run(cmd, ['bench', 'attention', '--json'] + common):
                j = json.loads(line)
                res.setdefault((j['T'], j['variant'], label), []).append(j)
                print(f"round {r} {label:>12} {j['variant']:>10} T={j['T']} {j['ms']:9.1f} ms "
                      f"{j['gflops']:7.1f} GFLOP/s busy {j['cores_busy']:.2f}", flush=True)
    print(f"\n{'config':>12} {'variant':>10} {'T':>6} {'target':>6} {'ms':>9} {'GFLOP/s':>8} "
          f"{'GFLOP/CPU-s':>11} {'busy':>9} n")
    med = statistics.median
    for (T, variant, label), v in sorted(res.items()):
        print(f"{label:>12} {variant:>10} {T:>6} {v[0].get('simd_target', '-'):>6} "
              f"{med(x['ms'] for x in v):9.1f} {med(x['gflops'] for x in v):8.1f} "
              f"{med(x['gflops'] / x['cores_busy'] for x in v):11.1f} "
              f"{min(x['cores_busy'] for x in v):.2f}-{max(x['cores_busy'] for x in v):.2f} {len(v)}")


def model(rounds, threads, specs):
    res = {}
    for r, order in rotations(specs, rounds):
        for t in threads:
            for label, cmd in order:
                rows = json.loads(run(cmd, ['bench', 'model', '--prompt', '16384', '-n', '32',
                                            '--variants', 'full,cca', '--repeat', '1',
                                            '--threads', t, '--json'])[-1])
                for row in rows:
                    variant = row['variant'].split('(')[0]
                    res.setdefault((t, variant, label), []).append(row)
                    print(f"round {r} threads {t} {label:>12} {variant:>5} prefill "
                          f"{row['prefill_s']:.3f} s decode {row['decode_tok_s']:.1f} tok/s",
                          flush=True)
    print(f"\n{'config':>12} {'threads':>7} {'variant':>7} {'prefill s':>9}  {'decode tok/s':>12}"
          f"  prefill s of each round")
    med = statistics.median
    for (t, variant, label), v in sorted(res.items()):
        print(f"{label:>12} {t:>7} {variant:>7} {med(x['prefill_s'] for x in v):9.3f}  "
              f"{med(x['decode_tok_s'] for x in v):12.1f}  "
              + ' '.join(f"{x['prefill_s']:.3f}" for x in v))


if __name__ == '__main__':
    mode, rounds = sys.argv[1], int(sys.argv[2])
    if mode == 'attention':
        sep = sys.argv.index('--') if '--' in sys.argv else len(sys.argv)
        attention(rounds, [s.split('=', 1) for s in sys.argv[3:sep]], sys.argv[sep + 1:])
    else:
        model(rounds, sys.argv[3].split(','), [s.split('=', 1) for s in sys.argv[4:]])
