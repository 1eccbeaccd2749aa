package spark_kms.bridge;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.delta.storage.AzureLogStore;
import io.delta.storage.CloseableIterator;
import io.delta.storage.GCSLogStore;
import io.delta.storage.HDFSLogStore;
import io.delta.storage.LogStore;
import io.delta.storage.S3SingleDriverLogStore;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FileStatus;
import org.apache.hadoop.fs.Path;

/**
 * Delta Lake log store ({@code spark.delta.logStore.class}) that keeps values of encrypted
 * columns out of the {@code _delta_log} of spark_kms tables.
 *
 * <p>For a commit of a spark_kms table it checks and changes the actions before they are written:
 *
 * <ul>
 *   <li>Delta records the predicates of DELETE, UPDATE, MERGE and {@code replaceWhere} in {@code
 *       commitInfo.operationParameters}, literals included, so {@code DELETE WHERE tailnum =
 *       'N14228'} would put {@code N14228} into the log. Every operation parameter outside {@link
 *       #SAFE_PARAMETERS} is replaced with {@link #REDACTED}.
 *   <li>A {@code metaData} action whose table properties differ from {@link #REQUIRED_PROPERTIES},
 *       or that names statistics columns, rejects the commit.
 *   <li>An {@code add} action whose statistics hold more than the row count (minimum, maximum,
 *       null count) rejects the commit.
 * </ul>
 *
 * <p>A rejected commit fails the Delta operation, and nothing of it becomes visible. Other
 * actions, and the logs of other tables, are written unchanged.
 *
 * <p>Everything else is delegated to the log store Delta picks for the path's scheme by default
 * (Delta 4.4: S3 single-driver, Azure, GCS, or HDFS for every other scheme).
 */
public final class KmsLogStore extends LogStore {

  static final String REDACTED = "[redacted by spark_kms]";

  /** Parameters whose values are names, modes or versions, never column values. */
  static final Set<String> SAFE_PARAMETERS =
      Set.of(
          "mode",
          "partitionBy",
          "clusterBy",
          "zOrderBy",
          "auto",
          "isManaged",
          "statsOnLoad",
          "properties",
          "batchId",
          "queryId",
          "epochId",
          "outputMode",
          "version",
          "timestamp");

  /** Table properties of a spark_kms Delta table, as {@code spark_kms.delta_lake} sets them. */
  static final Map<String, String> REQUIRED_PROPERTIES =
      Map.of(
          "delta.dataSkippingNumIndexedCols", "0",
          "delta.checkpoint.writeStatsAsJson", "false",
          "delta.checkpoint.writeStatsAsStruct", "false",
          "delta.enableDeletionVectors", "false");

  static final String STATS_COLUMNS_PROPERTY = "delta.dataSkippingStatsColumns";

  /** Statistics that contain no column value. */
  static final Set<String> SAFE_STATISTICS = Set.of("numRecords", "tightBounds");

  private static final ObjectMapper JSON = new ObjectMapper();

  private final Map<String, LogStore> delegates = new ConcurrentHashMap<>();

  public KmsLogStore(Configuration initHadoopConf) {
    super(initHadoopConf);
  }

  @Override
  public CloseableIterator<String> read(Path path, Configuration hadoopConf) throws IOException {
    return delegate(path).read(path, hadoopConf);
  }

  @Override
  public void write(
      Path path, Iterator<String> actions, Boolean overwrite, Configuration hadoopConf)
      throws IOException {
    Iterator<String> lines = actions;
    if (path.getName().endsWith(".json")) {
      Optional<SparkKmsTable> table = SparkKmsTable.containing(path.getParent(), hadoopConf);
      if (table.isPresent()) {
        List<String> checked = new ArrayList<>();
        while (actions.hasNext()) {
          checked.add(checkAction(actions.next(), path, table.get().name));
        }
        lines = checked.iterator();
      }
    }
    delegate(path).write(path, lines, overwrite, hadoopConf);
  }

  @Override
  public Iterator<FileStatus> listFrom(Path path, Configuration hadoopConf) throws IOException {
    return delegate(path).listFrom(path, hadoopConf);
  }

  @Override
  public Path resolvePathOnPhysicalStorage(Path path, Configuration hadoopConf)
      throws IOException {
    return delegate(path).resolvePathOnPhysicalStorage(path, hadoopConf);
  }

  @Override
  public Boolean isPartialWriteVisible(Path path, Configuration hadoopConf) throws IOException {
    return delegate(path).isPartialWriteVisible(path, hadoopConf);
  }

  /**
   * Return the action {@code line} as it may be written to {@code path}: a commitInfo with its
   * unsafe operation parameters redacted, any other action unchanged.
   *
   * @throws IOException naming the table if the action breaks a rule of the class comment
   */
  static String checkAction(String line, Path path, String table) throws IOException {
    if (line.startsWith("{\"commitInfo\"")) {
      return redactCommitInfo(line);
    }
    if (line.startsWith("{\"metaData\"")) {
      checkProperties(parse(line).path("metaData").path("configuration"), path, table);
    } else if (line.startsWith("{\"add\"")) {
      checkStatistics(parse(line).path("add"), path, table);
    }
    return line;
  }

  private static void checkProperties(JsonNode configuration, Path path, String table)
      throws IOException {
    List<String> wrong = new ArrayList<>();
    for (Map.Entry<String, String> required : new TreeMap<>(REQUIRED_PROPERTIES).entrySet()) {
      JsonNode value = configuration.get(required.getKey());
      if (value == null || !required.getValue().equals(value.asText())) {
        wrong.add(required.getKey() + "=" + required.getValue());
      }
    }
    if (configuration.has(STATS_COLUMNS_PROPERTY)) {
      wrong.add(STATS_COLUMNS_PROPERTY + " unset");
    }
    if (!wrong.isEmpty()) {
      throw rejected(
          path,
          table,
          "its table properties would let _delta_log keep column statistics; they must be "
              + String.join(", ", wrong)
              + " (spark_kms.write_delta creates tables so)");
    }
  }

  private static void checkStatistics(JsonNode add, Path path, String table) throws IOException {
    JsonNode stats = add.get("stats");
    if (stats == null || stats.isNull()) {
      return;
    }
    List<String> unsafe = new ArrayList<>();
    parse(stats.asText()).fieldNames().forEachRemaining(
        name -> {
          if (!SAFE_STATISTICS.contains(name)) {
            unsafe.add(name);
          }
        });
    if (!unsafe.isEmpty()) {
      throw rejected(
          path,
          table,
          "the statistics of file "
              + add.path("path").asText()
              + " hold "
              + String.join(", ", unsafe)
              + ", values of encrypted columns");
    }
  }

  private static IOException rejected(Path path, String table, String reason) {
    return new IOException(
        Messages.error(
            "ConfigurationError",
            "rejected Delta commit " + path + " of spark_kms table '" + table + "': " + reason));
  }

  private static JsonNode parse(String json) throws IOException {
    try {
      return JSON.readTree(json);
    } catch (IOException error) {
      throw new IOException("Delta wrote an action that is not valid JSON", error);
    }
  }

  /** Return the commitInfo action {@code line} with unsafe operation parameters redacted. */
  static String redactCommitInfo(String line) throws IOException {
    JsonNode action = parse(line);
    JsonNode parameters = action.path("commitInfo").path("operationParameters");
    if (!(parameters instanceof ObjectNode)) {
      return line;
    }
    ObjectNode editable = (ObjectNode) parameters;
    List<String> names = new ArrayList<>();
    editable.fieldNames().forEachRemaining(names::add);
    for (String name : names) {
      if (!SAFE_PARAMETERS.contains(name)) {
        editable.put(name, REDACTED);
      }
    }
    return JSON.writeValueAsString(action);
  }

  private LogStore delegate(Path path) {
    String scheme = path.toUri().getScheme();
    return delegates.computeIfAbsent(scheme == null ? "" : scheme, this::createDelegate);
  }

  private LogStore createDelegate(String scheme) {
    Configuration configuration = initHadoopConf();
    switch (scheme) {
      case "s3":
      case "s3a":
      case "s3n":
        return new S3SingleDriverLogStore(configuration);
      case "abfs":
      case "abfss":
      case "adl":
      case "wasb":
      case "wasbs":
        return new AzureLogStore(configuration);
      case "gs":
        return new GCSLogStore(configuration);
      default:
        return new HDFSLogStore(configuration);
    }
  }
}
