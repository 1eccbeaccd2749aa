package spark_kms.bridge;

import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.Collections;
import java.util.Map;
import java.util.TreeMap;
import org.apache.hadoop.conf.Configuration;
import org.apache.parquet.crypto.KeyAccessDeniedException;
import org.apache.parquet.crypto.keytools.KeyToolkit;
import org.apache.parquet.crypto.keytools.KmsClient;

/**
 * A parquet-mr KMS client that wraps and unwraps DEKs with the KEKs of the Spark session.
 *
 * <p>The "master key identifier" parquet-mr passes is the KEK id. The wrap is parquet-mr's local
 * wrap ({@link KeyToolkit#encryptKeyLocally}): AES-GCM with a random 12-byte nonce, the KEK id as
 * UTF-8 associated data, and base64 of nonce, ciphertext and tag. spark_kms's Python path
 * ({@code spark_kms.localwrap}) writes the same bytes, so either path reads the other's files.
 *
 * <p>The KEKs come from the Hadoop configuration property {@link BridgeSettings#KEKS}. This class
 * never logs them, and {@link #toString} shows only their ids.
 */
public final class JobKmsClient implements KmsClient {

  private Map<String, byte[]> keks = Collections.emptyMap();

  @Override
  public void initialize(
      Configuration configuration, String kmsInstanceId, String kmsInstanceUrl, String accessToken)
      throws KeyAccessDeniedException {
    keks = parseKeks(configuration.get(BridgeSettings.KEKS, ""));
  }

  @Override
  public String wrapKey(byte[] keyBytes, String masterKeyIdentifier)
      throws KeyAccessDeniedException {
    return KeyToolkit.encryptKeyLocally(
        keyBytes, kek(masterKeyIdentifier), masterKeyIdentifier.getBytes(StandardCharsets.UTF_8));
  }

  @Override
  public byte[] unwrapKey(String wrappedKey, String masterKeyIdentifier)
      throws KeyAccessDeniedException {
    return KeyToolkit.decryptKeyLocally(
        wrappedKey, kek(masterKeyIdentifier), masterKeyIdentifier.getBytes(StandardCharsets.UTF_8));
  }

  @Override
  public String toString() {
    return "JobKmsClient(key ids " + keks.keySet() + ")";
  }

  private byte[] kek(String kekId) throws KeyAccessDeniedException {
    byte[] kek = keks.get(kekId);
    if (kek == null) {
      throw new KeyAccessDeniedException(
          Messages.error(
              "KeyNotFoundError",
              "the file is encrypted under KEK '"
                  + kekId
                  + "', which is not loaded in this Spark session; read the table with"
                  + " spark_kms.read_parquet or spark_kms.read_delta, or inside"
                  + " spark_kms.table_keys, which unwrap its KEKs first"));
    }
    return kek;
  }

  /**
   * Parse {@code <kek id>:<base64 KEK>} entries separated by commas.
   *
   * @throws IllegalArgumentException naming the entry's position (never its value) when an entry
   *     is malformed
   */
  static Map<String, byte[]> parseKeks(String text) {
    Map<String, byte[]> parsed = new TreeMap<>();
    if (text.isBlank()) {
      return parsed;
    }
    String[] entries = text.split(",");
    for (int position = 0; position < entries.length; position++) {
      String entry = entries[position].trim();
      int colon = entry.indexOf(':');
      byte[] kek;
      try {
        kek = colon > 0 ? Base64.getDecoder().decode(entry.substring(colon + 1)) : new byte[0];
      } catch (IllegalArgumentException error) {
        kek = new byte[0];
      }
      if (kek.length != 16 && kek.length != 24 && kek.length != 32) {
        throw new IllegalArgumentException(
            "entry "
                + (position + 1)
                + " of "
                + BridgeSettings.KEKS
                + " is not '<kek id>:<base64 of a 16, 24 or 32 byte KEK>'");
      }
      parsed.put(entry.substring(0, colon), kek);
    }
    return parsed;
  }
}
