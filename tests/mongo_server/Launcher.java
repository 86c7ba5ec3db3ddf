// Test-only launcher for mongo-java-server; see tests/mongo_harness.py.
// Usage: java -cp target/classes:target/lib/* Launcher PORT [H2_FILE_PATH]
// Prints "READY 127.0.0.1:PORT" once listening; exits on stdin EOF or SIGTERM.

import de.bwaldvogel.mongo.MongoBackend;
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;
import java.util.List;

public final class Launcher {
    // ServerVersion.MONGO_5_0 (newest enum value, and the default) reports maxWireVersion 8,
    // which pymongo >= 4.18 rejects; claim 5.0.0 with its real wire version 13 instead.
    // The version is only used in hello/buildInfo replies, it does not change behaviour.
    private static final MongoVersion VERSION = new MongoVersion() {
        @Override
        public List<Integer> getVersionArray() {
            return List.of(5, 0, 0);
        }

        @Override
        public int getWireVersion() {
            return 13;
        }
    };

    public static void main(String[] args) throws Exception {
        if (args.length < 1 || args.length > 2) {
            System.err.println("usage: Launcher PORT [H2_FILE_PATH]");
            System.exit(2);
        }
        int port = Integer.parseInt(args[0]);
        MongoBackend backend = args.length == 2 ? new H2Backend(args[1]) : new MemoryBackend();
        backend.version(VERSION);
        MongoServer server = new MongoServer(backend);
        server.enableOplog(); // change streams need the oplog
        Runtime.getRuntime().addShutdownHook(new Thread(server::shutdown, "mongo-shutdown"));
        server.bind("127.0.0.1", port);
        System.out.println("READY 127.0.0.1:" + port);
        System.out.flush();
        Thread stdinWatcher = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // discard; we only wait for EOF (parent closed the pipe or died)
                }
            } catch (Exception ignored) {
                // treat read errors like EOF
            }
            System.exit(0);
        }, "stdin-watcher");
        stdinWatcher.setDaemon(true);
        stdinWatcher.start();
    }
}
