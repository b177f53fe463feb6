-- The designated writer of a MariaDB Galera cluster (lockstock::route::Router): ONE row naming
-- the node (its `@@wsrep_node_name`) that every lockstock process sends its writes to. A router
-- adopts the node named here while it is healthy; a failover is a compare-and-set on `epoch`
-- made through the new writer itself (so `node_name` is always the name of the node that wrote
-- the row), and Galera's certification lets exactly one of two racing failovers commit.
-- The empty name of the first row means "none designated yet". Unused on a single server.
CREATE TABLE designated_writer (
    id          TINYINT     NOT NULL,
    node_name   VARCHAR(64) NOT NULL DEFAULT '',
    epoch       BIGINT      NOT NULL DEFAULT 0,
    changed_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    CONSTRAINT designated_writer_one_row CHECK (id = 1),
    CONSTRAINT designated_writer_epoch_non_negative CHECK (epoch >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

INSERT INTO designated_writer (id, node_name, epoch) VALUES (1, '', 0);
