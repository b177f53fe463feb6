ALTER TABLE designated_writer MODIFY node_name VARCHAR(64) NOT NULL DEFAULT '';
