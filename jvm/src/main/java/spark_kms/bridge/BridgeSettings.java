package spark_kms.bridge;

/**
 * Names of the Hadoop configuration properties that the Python driver sets for the bridge.
 *
 * <p>The driver sets them in the Spark session's SQL configuration, which Spark copies into the
 * Hadoop configuration of every job and ships to the executors. None of the names starts with
 * {@code spark}, so Spark does not also copy them into job properties.
 */
public final class BridgeSettings {

  /**
   * The KEKs loaded into the session, as {@code <kek id>:<base64 KEK>} entries separated by
   * commas. The name contains {@code secret} so that Spark's default {@code
   * spark.redaction.regex} hides the value in plans, the event log and the UI.
   */
  public static final String KEKS = "kms.bridge.keks.secret";

  /** Id of the table whose write keys are configured (from its {@code table.json}). */
  public static final String WRITE_TABLE_ID = "kms.bridge.write.table.id";

  /**
   * Id of the KEK that encrypts the Parquet files Delta Lake writes into the table's {@code
   * _delta_log} folder (checkpoints), with no column keys because their schema is Delta's.
   */
  public static final String DELTA_LOG_KEY = "kms.bridge.delta.log.key";

  private BridgeSettings() {}
}
