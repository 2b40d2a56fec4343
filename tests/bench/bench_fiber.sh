#!/bin/sh
# Fiber benchmark: 100,000 fibers created and joined (time, peak RSS) and 10,000
# fibers sleeping 10 ms. BENCH_SIZE=tiny runs 1,000.
set -eu
n=100000
[ "${BENCH_SIZE:-full}" = tiny ] && n=1000
"${FACTORY_BIN:-./factory}" tests/bench/fiber.lua "$n"
