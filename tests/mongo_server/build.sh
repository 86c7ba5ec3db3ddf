#!/usr/bin/env bash
# Build the mongo-java-server test launcher into tests/mongo_server/target/.
# Idempotent: does nothing when target/ is newer than pom.xml, Launcher.java and build.sh.
# Jars are resolved from Maven Central and cached in ~/.m2.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
stamp=target/.built
up_to_date() {
    [[ -f "$stamp" && "$stamp" -nt pom.xml && "$stamp" -nt Launcher.java && "$stamp" -nt build.sh
        && -f target/classes/Launcher.class && -d target/lib ]]
}
up_to_date && exit 0
mkdir -p target
if command -v flock >/dev/null; then  # concurrent test processes: build once
    exec 9>target/.build.lock
    flock -w 600 9
    up_to_date && exit 0
fi
command -v mvn >/dev/null || { echo "build.sh: mvn not found on PATH" >&2; exit 1; }
command -v javac >/dev/null || { echo "build.sh: javac not found on PATH" >&2; exit 1; }
rm -rf target/lib target/classes "$stamp"
mvn -q -B -Dstyle.color=never -f pom.xml dependency:copy-dependencies \
    -DoutputDirectory=target/lib -DincludeScope=runtime
mkdir -p target/classes
javac -nowarn --release 17 -cp 'target/lib/*' -d target/classes Launcher.java
touch "$stamp"
