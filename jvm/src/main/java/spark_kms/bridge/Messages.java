package spark_kms.bridge;

/** Error texts in the form spark_kms's Python side turns back into its own exceptions. */
final class Messages {

  private Messages() {}

  /**
   * Return {@code spark_kms.errors.<errorClass>: <message>}.
   *
   * <p>{@code spark_kms.typed_errors()} finds this pattern in the text of a Spark exception and
   * raises the named spark_kms error.
   */
  static String error(String errorClass, String message) {
    return "spark_kms.errors." + errorClass + ": " + message;
  }

  /** Return the message of spark_kms's {@code TableErasedError} for {@code table}. */
  static String tableErased(String table) {
    return error(
        "TableErasedError",
        "table '"
            + table
            + "' was crypto-erased: its master key no longer exists, so its files cannot be"
            + " decrypted and no new data can be written to it");
  }
}
