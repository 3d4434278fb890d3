"""A real HiveServer2 for tests and benchmarks: the Spark Thrift Server shipped inside the pyspark package."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pyspark


@dataclass
class HiveServer:
    host: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_hive_server(workdir: Path, *, timeout_s: float = 180) -> HiveServer:
    """Start a Spark Thrift Server on a free loopback port with its own warehouse and metastore; wait until it answers."""
    if shutil.which("java") is None:
        raise RuntimeError(
            "java is not installed; the Spark Thrift Server needs Java 17 (apt-get install openjdk-17-jre-headless)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    spark_home = Path(pyspark.__file__).parent
    port = _free_port()
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home),
        "SPARK_LOG_DIR": str(workdir / "logs"),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    args = [
        str(spark_home / "bin" / "spark-submit"),
        "--class",
        "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2",
        "--master",
        "local[2]",
        "--driver-memory",
        "2g",
        "--conf",
        f"spark.sql.warehouse.dir={workdir / 'warehouse'}",
        "--conf",
        f"spark.driver.extraJavaOptions=-Dderby.system.home={workdir / 'derby'}",
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.sql.shuffle.partitions=4",
        "--conf",
        f"spark.local.dir={workdir / 'tmp'}",
        "--hiveconf",
        f"hive.server2.thrift.port={port}",
        "--hiveconf",
        "hive.server2.thrift.bind.host=127.0.0.1",
        "--hiveconf",
        f"javax.jdo.option.ConnectionURL=jdbc:derby:;databaseName={workdir / 'metastore'};create=true",
        "spark-internal",
    ]
    log = (workdir / "server.log").open("ab")
    proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = HiveServer(host="127.0.0.1", port=port, workdir=workdir, process=proc)
    deadline = time.monotonic() + timeout_s
    from pyhive import hive

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the Spark Thrift Server exited while starting:\n{server.log_tail()}")
        try:
            conn = hive.connect(host="127.0.0.1", port=port, username="test")
            conn.close()
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"the Spark Thrift Server did not answer in {timeout_s} s:\n{server.log_tail()}"
                ) from None
            time.sleep(1)


def run_sql(server: HiveServer, *statements: str) -> None:
    """Run statements one by one on a fresh session."""
    from pyhive import hive

    conn = hive.connect(host=server.host, port=server.port, username="test")
    try:
        cursor = conn.cursor()
        for sql in statements:
            cursor.execute(sql)
        cursor.close()
    finally:
        conn.close()
