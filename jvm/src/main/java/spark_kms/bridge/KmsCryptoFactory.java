package spark_kms.bridge;

import java.io.IOException;
import java.util.Optional;
import java.util.regex.Pattern;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.Path;
import org.apache.parquet.crypto.DecryptionKeyRetriever;
import org.apache.parquet.crypto.DecryptionPropertiesFactory;
import org.apache.parquet.crypto.EncryptionPropertiesFactory;
import org.apache.parquet.crypto.FileDecryptionProperties;
import org.apache.parquet.crypto.FileEncryptionProperties;
import org.apache.parquet.crypto.ParquetCryptoRuntimeException;
import org.apache.parquet.crypto.keytools.KeyToolkit;
import org.apache.parquet.crypto.keytools.PropertiesDrivenCryptoFactory;
import org.apache.parquet.hadoop.api.WriteSupport.WriteContext;

/**
 * parquet-mr's crypto factory ({@code parquet.crypto.factory.class}) for Spark sessions that use
 * spark_kms.
 *
 * <p>Spark's Parquet writer and reader, and so Delta Lake, ask this factory for the encryption
 * properties of every Parquet file they open. It decides by the spark_kms table the file belongs
 * to:
 *
 * <ul>
 *   <li>A file in no spark_kms table is written and read as without this factory.
 *   <li>A file of an erased table, or of a table scheduled for deletion, is rejected.
 *   <li>A file written into a table is encrypted with that table's write keys, which the session
 *       names in {@link BridgeSettings#WRITE_TABLE_ID}; without them the write is rejected, never
 *       written in plaintext. Delta's checkpoints in {@code _delta_log} are encrypted whole with
 *       the KEK named by {@link BridgeSettings#DELTA_LOG_KEY}.
 *   <li>A file read from a table must be encrypted; a plaintext file is rejected.
 * </ul>
 *
 * <p>Encryption itself is parquet-mr's {@link PropertiesDrivenCryptoFactory} with the settings of
 * spark_kms's Python path: 256-bit DEKs wrapped directly by the KEKs (no double wrapping), key
 * material inside the footer, encrypted footer, AES_GCM_V1, and every column encrypted: those in
 * {@code parquet.encryption.column.keys} with their KEK, the others with the footer KEK.
 */
public final class KmsCryptoFactory
    implements EncryptionPropertiesFactory, DecryptionPropertiesFactory {

  static final String FOOTER_KEY = PropertiesDrivenCryptoFactory.FOOTER_KEY_PROPERTY_NAME;
  static final String COLUMN_KEYS = PropertiesDrivenCryptoFactory.COLUMN_KEYS_PROPERTY_NAME;
  static final String UNIFORM_KEY = PropertiesDrivenCryptoFactory.UNIFORM_KEY_PROPERTY_NAME;
  static final int DEK_BITS = 256;

  // Words of parquet-mr's errors about a file's key metadata, whose message then quotes it.
  private static final Pattern KEY_MATERIAL_ERROR =
      Pattern.compile("key metadata|key material|wrapped(dek|kek)", Pattern.CASE_INSENSITIVE);

  private final PropertiesDrivenCryptoFactory delegate = new PropertiesDrivenCryptoFactory();

  @Override
  public FileEncryptionProperties getFileEncryptionProperties(
      Configuration configuration, Path file, WriteContext context)
      throws ParquetCryptoRuntimeException {
    Optional<SparkKmsTable> found = tableOf(file, configuration);
    if (found.isEmpty()) {
      return null;
    }
    SparkKmsTable table = found.get();
    if (table.stateError() != null) {
      throw new ParquetCryptoRuntimeException(table.stateError());
    }
    if (!table.id.equals(configuration.getTrimmed(BridgeSettings.WRITE_TABLE_ID, ""))) {
      throw rejectedWrite(file, table, "this Spark session has no write keys for it");
    }

    if (table.isDeltaLogPath(file)) {
      String logKey = configuration.getTrimmed(BridgeSettings.DELTA_LOG_KEY, "");
      if (logKey.isEmpty()) {
        throw rejectedWrite(file, table, "no KEK for its Delta log is configured");
      }
      return delegate.getFileEncryptionProperties(
          writeConfiguration(configuration, logKey, ""), file, context);
    }
    String footerKey = configuration.getTrimmed(FOOTER_KEY, "");
    if (footerKey.isEmpty()) {
      throw rejectedWrite(file, table, "no footer KEK is configured");
    }
    return delegate.getFileEncryptionProperties(
        writeConfiguration(configuration, footerKey, configuration.getTrimmed(COLUMN_KEYS, "")),
        file,
        context);
  }

  @Override
  public FileDecryptionProperties getFileDecryptionProperties(
      Configuration configuration, Path file) throws ParquetCryptoRuntimeException {
    Optional<SparkKmsTable> found = tableOf(file, configuration);
    if (found.isEmpty()) {
      return null;
    }
    SparkKmsTable table = found.get();
    if (table.stateError() != null) {
      throw new ParquetCryptoRuntimeException(table.stateError());
    }
    FileDecryptionProperties allowingPlaintext =
        delegate.getFileDecryptionProperties(baseConfiguration(configuration), file);
    // PropertiesDrivenCryptoFactory accepts plaintext files. In a spark_kms table a plaintext
    // file is an error, so only its key retriever is kept.
    DecryptionKeyRetriever retriever = allowingPlaintext.getKeyRetriever();
    return FileDecryptionProperties.builder()
        .withKeyRetriever(keyMetadata -> retrieveKey(retriever, keyMetadata, file))
        .build();
  }

  /**
   * Returns the DEK for {@code keyMetadata}. parquet-mr's errors about invalid key metadata quote
   * the metadata, wrapped DEK included, so they are replaced by an error without that text and
   * without the original as its cause.
   */
  private static byte[] retrieveKey(
      DecryptionKeyRetriever retriever, byte[] keyMetadata, Path file) {
    try {
      return retriever.getKey(keyMetadata);
    } catch (RuntimeException error) {
      String message = String.valueOf(error.getMessage());
      if (!KEY_MATERIAL_ERROR.matcher(message).find()) {
        throw error;
      }
      throw new ParquetCryptoRuntimeException(
          Messages.error(
              "IntegrityError",
              "cannot decrypt "
                  + file
                  + ": "
                  + error.getClass().getSimpleName()
                  + ": the key metadata of the file is invalid (its text is left out: it contains"
                  + " wrapped keys); the file is damaged, was changed, or was written under keys"
                  + " this table does not hold"));
    }
  }

  private static Optional<SparkKmsTable> tableOf(Path file, Configuration configuration) {
    try {
      return SparkKmsTable.containing(file.getParent(), configuration);
    } catch (IOException error) {
      throw new ParquetCryptoRuntimeException(
          "cannot tell whether " + file + " belongs to a spark_kms table: " + error.getMessage(),
          error);
    }
  }

  private static ParquetCryptoRuntimeException rejectedWrite(
      Path file, SparkKmsTable table, String reason) {
    return new ParquetCryptoRuntimeException(
        Messages.error(
            "ConfigurationError",
            "rejected a write of "
                + file
                + " into spark_kms table '"
                + table.name
                + "' because "
                + reason
                + "; write with spark_kms.write_parquet, spark_kms.write_delta or inside"
                + " spark_kms.table_keys(spark, path, table=...)"));
  }

  /** Return a copy of {@code configuration} with the settings the Python path also uses. */
  static Configuration baseConfiguration(Configuration configuration) {
    Configuration bridge = new Configuration(configuration);
    bridge.set(KeyToolkit.KMS_CLIENT_CLASS_PROPERTY_NAME, JobKmsClient.class.getName());
    bridge.setBoolean(KeyToolkit.DOUBLE_WRAPPING_PROPERTY_NAME, false);
    bridge.setBoolean(KeyToolkit.KEY_MATERIAL_INTERNAL_PROPERTY_NAME, true);
    bridge.setInt(KeyToolkit.DATA_KEY_LENGTH_PROPERTY_NAME, DEK_BITS);
    bridge.setBoolean(PropertiesDrivenCryptoFactory.PLAINTEXT_FOOTER_PROPERTY_NAME, false);
    bridge.set(PropertiesDrivenCryptoFactory.ENCRYPTION_ALGORITHM_PROPERTY_NAME, "AES_GCM_V1");
    return bridge;
  }

  /**
   * Return the configuration that encrypts a file with {@code footerKey} and, if not empty,
   * {@code columnKeys} (parquet-mr's {@code <kek id>:<column>,<column>;...} syntax).
   */
  static Configuration writeConfiguration(
      Configuration configuration, String footerKey, String columnKeys) {
    Configuration bridge = baseConfiguration(configuration);
    // parquet-mr takes either a uniform key, or a footer key with column keys. With column keys,
    // complete.columns puts every column they do not list under the footer KEK, because PME
    // leaves unlisted columns in plaintext.
    if (columnKeys.isEmpty()) {
      bridge.unset(FOOTER_KEY);
      bridge.unset(COLUMN_KEYS);
      bridge.set(UNIFORM_KEY, footerKey);
    } else {
      bridge.unset(UNIFORM_KEY);
      bridge.set(FOOTER_KEY, footerKey);
      bridge.set(COLUMN_KEYS, columnKeys);
      bridge.setBoolean(
          PropertiesDrivenCryptoFactory.COMPLETE_COLUMN_ENCRYPTION_PROPERTY_NAME, true);
    }
    return bridge;
  }
}
