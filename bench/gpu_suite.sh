#!/usr/bin/env bash
# Runs benchmark stages on the GPU machine, each with its own time limit, logging to $OUT/<stage>.log.
#   bash bench/gpu_suite.sh masking data smoke scaling ...
# Stages are listed below; every stage's log ends with its table. See bench/README.md.
set -u
. bench/device_setup.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) $(date +%T)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $(date +%T)"; tail -n 14 "$OUT/$name.log"
}
wait_ops() { wait "$OP_BUILD_PID" 2>/dev/null; tail -n 2 /tmp/op_build.log; }
for s in "$@"; do case $s in
  masking) stage masking 150 python3 bench/masking.py --device cuda --iters 200
           stage masking_tests 120 python3 -m pytest -q tests/test_masking.py -k cuda ;;
  data) stage data 240 python3 bench/data.py --num_files 2000 --workers 16 --seconds 20 ;;
  smoke) wait_ops; stage smoke 240 python3 pretrain.py --model_name_or_path base --train_dir /tmp/w2v_scaling_corpus/audio \
           --output_dir /tmp/smoke --max_train_steps 20 --logging_steps 5 --saving_steps 10 --per_device_train_batch_size 8 \
           --min_duration_in_seconds 2 --max_duration_in_seconds 20 --validation_split_percentage 2 --learning_rate 5e-4 \
           --dataloader_num_workers 6 ;;
  corpus) stage corpus 200 python3 -c "import sys; sys.argv=['x']; sys.path.insert(0,'bench'); from scaling import corpus; print(corpus('/tmp/w2v_scaling_corpus', 800, 16))" ;;
  scaling) wait_ops; eval "stage scaling ${SCALING_LIMIT:-420} python3 bench/scaling.py --gpus 2 --models ${SCALING_MODELS:-base} --steps 25 ${SCALING_FLAGS:-} --json $OUT/scaling.json" ;;  # eval: quoted --engine_flags
  throughput) wait_ops; stage throughput 480 python3 bench/throughput.py ${THROUGHPUT_FLAGS:-} --json "$OUT/throughput.json" ;;
  profile) stage profile ${PROFILE_LIMIT:-300} python3 bench/profile_step.py ${PROFILE_FLAGS:-} ;;
  memory) wait_ops; stage memory ${MEMORY_LIMIT:-540} python3 bench/memory.py ${MEMORY_FLAGS:-} ;;
  *) echo "unknown stage $s" ;;
esac; done
