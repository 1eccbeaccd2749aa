#!/usr/bin/env bash
# Run the main job with spark-submit on local[2], with the bootstrap's settings.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYSPARK_PYTHON="$root/.venv/bin/python"
export PYSPARK_DRIVER_PYTHON="$root/.venv/bin/python"
export SPARK_LOCAL_IP=127.0.0.1
mkdir -p demo-output
exec "$root/.venv/bin/spark-submit" \
    --master 'local[2]' \
    --properties-file "$root/.state/spark-kms.conf" \
    --conf spark.ui.enabled=false \
    --conf spark.sql.shuffle.partitions=8 \
    --conf spark.driver.memory=4g \
    --conf "spark.driver.extraJavaOptions=-Dlog4j2.level=WARN" \
    "$root/scripts/demo_job.py" "$root/demo-output"
