#!/usr/bin/env bash
# Prepare a fresh Debian machine for spark_kms: SoftHSM2, the Python environment,
# a project-local SoftHSM2 token and the configuration that points at it.
# Safe to run again: every step checks what is already there.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.state"
venv="$root/.venv"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

# 1. SoftHSM2 from Debian's packages.
if ! command -v softhsm2-util >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "bootstrap: installing softhsm2 with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
    else
        echo "bootstrap: softhsm2 is missing; install it with 'sudo apt-get install softhsm2' and run again" >&2
        exit 1
    fi
fi
module=""
for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
    if [ -f "$candidate" ]; then module=$candidate; break; fi
done
if [ -z "$module" ]; then
    echo "bootstrap: libsofthsm2.so not found; reinstall the softhsm2 package" >&2
    exit 1
fi
if ! command -v java >/dev/null 2>&1; then
    echo "bootstrap: java is missing; install a JDK 17 (apt-get install openjdk-17-jdk-headless)" >&2
    exit 1
fi

# 2. The Python environment, pinned by constraints.txt. A stamp of the inputs'
#    hash makes a rerun skip pip when nothing changed.
stamp="$venv/.spark_kms-installed"
want=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing the Python environment into .venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -c "$root/constraints.txt" -e "$root[dev]"
    echo "$want" > "$stamp"
fi

# 3. A SoftHSM2 token in .state/, with a generated PIN kept in a 0600 file.
umask 077
mkdir -p "$state/tokens"
conf="$state/softhsm2.conf"
if [ ! -f "$conf" ]; then
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
        "$state/tokens" > "$conf"
fi
export SOFTHSM2_CONF="$conf"
label=spark-kms
if [ ! -s "$state/pin" ]; then
    "$venv/bin/python" -c 'import secrets; print(secrets.token_hex(16))' > "$state/pin"
    "$venv/bin/python" -c 'import secrets; print(secrets.token_hex(16))' > "$state/so-pin"
    chmod 600 "$state/pin" "$state/so-pin"
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*$label\b"; then
    echo "bootstrap: initializing SoftHSM2 token '$label'"
    # softhsm2-util takes PINs only as arguments; this runs once, on a developer machine.
    softhsm2-util --init-token --free --label "$label" \
        --pin "$(cat "$state/pin")" --so-pin "$(cat "$state/so-pin")" >/dev/null
fi

# 4. The Spark properties that point spark_kms at this token.
cat > "$state/spark-kms.conf" <<CONF
spark.kms.hsm.module            $module
spark.kms.hsm.token             $label
spark.kms.hsm.pin.file          $state/pin
spark.kms.hsm.softhsm2.conf     $conf
spark.kms.registry              $state/registry
spark.kms.audit.log             $state/audit.log
CONF

# 5. The JVM bridge and Delta Lake's jars, and the Spark properties that put
#    them on the classpath of spark-submit jobs (spark_kms.session_config()).
"$root/scripts/build_jvm.sh"
"$venv/bin/python" -c 'from spark_kms.bridge import main; raise SystemExit(main())' \
    >> "$state/spark-kms.conf"
chmod 644 "$state/spark-kms.conf"
echo "bootstrap: ready (token '$label', properties in .state/spark-kms.conf)"
