#!/usr/bin/env bash
# Build the JVM side of spark_kms: Delta Lake's jars, downloaded from Maven
# Central into .state/jars/, and the bridge (jvm/src), compiled into
# build/jars/spark-kms-bridge.jar. scripts/bootstrap.sh runs this script.
# Safe to run again: each step is skipped while its inputs are unchanged, so
# only the first run needs the network.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python="$root/.venv/bin/python"
jars="$root/.state/jars"
build="$root/build"
bridge_jar="$build/jars/spark-kms-bridge.jar"

for tool in mvn javac jar; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build_jvm: $tool is missing; install a JDK 17 and Maven (apt-get install openjdk-17-jdk-headless maven)" >&2
        exit 1
    fi
done
pyspark_jars=$("$python" -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')

# 1. Delta Lake's jars, as jvm/pom.xml lists them. Maven keeps its own
#    downloads (the dependency plugin) in .state/m2, inside the repository.
stamp="$jars/.pom-sha256"
want=$(sha256sum "$root/jvm/pom.xml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "build_jvm: downloading Delta Lake's jars from Maven Central into .state/jars"
    rm -rf "$jars"
    mkdir -p "$jars"
    # Maven prints its errors on stdout, so the output is shown only on failure.
    if ! output=$(mvn -B -q --strict-checksums -f "$root/jvm/pom.xml" \
        -Dmaven.repo.local="$root/.state/m2" -Djars.dir="$jars" dependency:copy 2>&1); then
        echo "$output" >&2
        echo "build_jvm: downloading Delta Lake's jars failed; check the access to Maven Central" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi

# 2. The bridge, compiled against pyspark's jars and delta-storage (KmsLogStore
#    extends its LogStore). Rebuilt when a source, pyspark or a Delta jar changes.
mapfile -t sources < <(find "$root/jvm/src/main/java" -name '*.java' | sort)
stamp="$build/jars/.bridge-sha256"
want=$( (cat "${sources[@]}"; ls "$pyspark_jars" "$jars") | sha256sum | cut -d' ' -f1)
if [ ! -f "$bridge_jar" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "build_jvm: compiling the JVM bridge into build/jars/spark-kms-bridge.jar"
    rm -rf "$build/jvm-classes"
    mkdir -p "$build/jvm-classes" "$build/jars"
    # -path: pyspark's jars name missing jars in their manifests' Class-Path.
    javac --release 17 -Xlint:all,-path -Werror -encoding UTF-8 \
        -cp "$pyspark_jars/*:$jars/*" -d "$build/jvm-classes" "${sources[@]}"
    jar --create --file "$bridge_jar" -C "$build/jvm-classes" .
    echo "$want" > "$stamp"
fi
