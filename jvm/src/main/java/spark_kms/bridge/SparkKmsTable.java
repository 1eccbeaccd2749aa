package spark_kms.bridge;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.InputStream;
import java.util.Optional;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;

/**
 * A spark_kms table as JVM code finds it: the folder that contains {@code _spark_kms/table.json},
 * and the name, id and state that file records.
 *
 * <p>{@link #containing} walks up from a path to the first folder with a keyring, so a file in a
 * partition folder, in Spark's {@code _temporary} folder or in {@code _delta_log} is found to
 * belong to its table.
 */
final class SparkKmsTable {

  static final String KEYRING_DIR = "_spark_kms";
  static final String METADATA_FILE = "table.json";
  static final String DELTA_LOG_DIR = "_delta_log";

  private static final ObjectMapper JSON = new ObjectMapper();

  final Path root;
  final String name;
  final String id;
  final String state;
  final String deletionDueAt;

  private SparkKmsTable(Path root, String name, String id, String state, String deletionDueAt) {
    this.root = root;
    this.name = name;
    this.id = id;
    this.state = state;
    this.deletionDueAt = deletionDueAt;
  }

  /**
   * Return the error text for a table whose state rejects reads and writes, or {@code null} for
   * an active table.
   */
  String stateError() {
    if ("erased".equals(state)) {
      return Messages.tableErased(name);
    }
    if ("pending_deletion".equals(state)) {
      return Messages.error(
          "TablePendingDeletionError",
          "table '"
              + name
              + "' is scheduled for deletion on "
              + deletionDueAt
              + ", so it cannot be read or written; to keep it, run 'spark-kms cancel-deletion "
              + name
              + "'");
    }
    return null;
  }

  /** Tell whether {@code path} lies in this table's {@code _delta_log} folder. */
  boolean isDeltaLogPath(Path path) {
    String log = root.toUri().getPath() + "/" + DELTA_LOG_DIR + "/";
    return path.toUri().getPath().startsWith(log);
  }

  /**
   * Return the table whose root is {@code path} or one of its ancestors.
   *
   * <p>NOTE: this checks for {@code _spark_kms/table.json} in every ancestor folder and reads
   * the file it finds, on every call, so that an erasure is seen at once. On an object store
   * that is one request per ancestor for each Parquet file opened.
   *
   * @throws IOException if the filesystem fails, or {@code table.json} is not valid metadata
   */
  static Optional<SparkKmsTable> containing(Path path, Configuration configuration)
      throws IOException {
    FileSystem filesystem = path.getFileSystem(configuration);
    Path folder = filesystem.makeQualified(path);
    while (folder != null) {
      Path metadata = new Path(new Path(folder, KEYRING_DIR), METADATA_FILE);
      if (filesystem.exists(metadata)) {
        return Optional.of(read(filesystem, folder, metadata));
      }
      folder = folder.getParent();
    }
    return Optional.empty();
  }

  private static SparkKmsTable read(FileSystem filesystem, Path root, Path metadata)
      throws IOException {
    JsonNode node;
    try (InputStream stream = filesystem.open(metadata)) {
      node = JSON.readTree(stream);
    } catch (com.fasterxml.jackson.core.JacksonException error) {
      throw new IOException(
          Messages.error("IntegrityError", metadata + " is not valid JSON table metadata"));
    }
    String name = text(node, "table", metadata);
    String id = text(node, "table_id", metadata);
    String state = text(node, "state", metadata);
    JsonNode due = node.get("deletion_due_at");
    return new SparkKmsTable(root, name, id, state, due != null && due.isTextual() ? due.asText() : "");
  }

  private static String text(JsonNode node, String field, Path metadata) throws IOException {
    JsonNode value = node == null ? null : node.get(field);
    if (value == null || !value.isTextual()) {
      throw new IOException(
          Messages.error(
              "IntegrityError",
              metadata + " has a missing or invalid field '" + field + "' (expected a string)"));
    }
    return value.asText();
  }
}
