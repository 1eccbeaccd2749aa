package spark_kms.bridge;

import java.io.IOException;
import java.util.Optional;
import org.apache.hadoop.conf.Configuration;
import org.apache.spark.sql.SaveMode;
import org.apache.spark.sql.SparkSession;
import org.apache.spark.sql.SparkSessionExtensions;
import org.apache.spark.sql.catalyst.plans.logical.LogicalPlan;
import org.apache.spark.sql.execution.datasources.InsertIntoHadoopFsRelationCommand;
import org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat;
import scala.Function1;
import scala.runtime.AbstractFunction1;
import scala.runtime.BoxedUnit;

/**
 * Spark session extension ({@code spark.sql.extensions}) that rejects unsafe writes of Spark's
 * own file writer into a spark_kms table before they start.
 *
 * <p>{@link KmsCryptoFactory} guards each Parquet file, but it cannot see two cases:
 *
 * <ul>
 *   <li>{@code mode("overwrite")} first deletes the whole output folder, the table's keyring
 *       {@code _spark_kms/} included, and only then writes; after that no file is in a spark_kms
 *       table any more, so the new files would be plaintext and the old KEK records lost.
 *   <li>A write in another format (CSV, JSON, ORC, text) never calls a Parquet crypto factory.
 * </ul>
 *
 * <p>This check rejects both, and a Parquet append into a table whose write keys are not
 * configured. Delta Lake does not use this command; its writes are guarded file by file.
 */
public final class KmsSessionExtension extends AbstractFunction1<SparkSessionExtensions, BoxedUnit> {

  @Override
  public BoxedUnit apply(SparkSessionExtensions extensions) {
    extensions.injectCheckRule(
        new AbstractFunction1<SparkSession, Function1<LogicalPlan, BoxedUnit>>() {
          @Override
          public Function1<LogicalPlan, BoxedUnit> apply(SparkSession session) {
            return new NativeWriteCheck(session);
          }
        });
    return BoxedUnit.UNIT;
  }

  /** The check rule: inspects every file-writing command of an analyzed plan. */
  static final class NativeWriteCheck extends AbstractFunction1<LogicalPlan, BoxedUnit> {

    private final SparkSession session;

    NativeWriteCheck(SparkSession session) {
      this.session = session;
    }

    @Override
    public BoxedUnit apply(LogicalPlan plan) {
      plan.foreach(
          new AbstractFunction1<LogicalPlan, BoxedUnit>() {
            @Override
            public BoxedUnit apply(LogicalPlan node) {
              if (node instanceof InsertIntoHadoopFsRelationCommand) {
                check((InsertIntoHadoopFsRelationCommand) node);
              }
              return BoxedUnit.UNIT;
            }
          });
      return BoxedUnit.UNIT;
    }

    private void check(InsertIntoHadoopFsRelationCommand command) {
      Configuration configuration =
          ((org.apache.spark.sql.classic.SparkSession) session)
              .sessionState()
              .newHadoopConfWithOptions(command.options());
      Optional<SparkKmsTable> found;
      try {
        found = SparkKmsTable.containing(command.outputPath(), configuration);
      } catch (IOException error) {
        throw new IllegalStateException(
            "cannot tell whether "
                + command.outputPath()
                + " is a spark_kms table: "
                + error.getMessage(),
            error);
      }
      if (found.isEmpty()) {
        return;
      }
      SparkKmsTable table = found.get();
      String prefix = "rejected a write to " + command.outputPath() + " in spark_kms table '"
          + table.name + "': ";
      if (table.stateError() != null) {
        throw new IllegalStateException(table.stateError());
      }
      if (!(command.fileFormat() instanceof ParquetFileFormat)) {
        throw new IllegalArgumentException(
            Messages.error(
                "ConfigurationError",
                prefix
                    + command.fileFormat()
                    + " files would be plaintext; a spark_kms table holds only encrypted Parquet"));
      }
      if (command.mode() == SaveMode.Overwrite) {
        throw new IllegalArgumentException(
            Messages.error(
                "ConfigurationError",
                prefix
                    + "mode 'overwrite' of Spark's Parquet writer deletes the folder with the"
                    + " table's keyring; use spark_kms.write_parquet(df, path, table=...,"
                    + " mode='overwrite')"));
      }
      String writeTableId = configuration.getTrimmed(BridgeSettings.WRITE_TABLE_ID, "");
      if (!table.id.equals(writeTableId)) {
        throw new IllegalArgumentException(
            Messages.error(
                "ConfigurationError",
                prefix
                    + "this Spark session has no write keys for the table; write with"
                    + " spark_kms.write_parquet or inside spark_kms.table_keys(spark, path,"
                    + " table=...)"));
      }
    }
  }
}
