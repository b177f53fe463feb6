-- A row naming a node of a longer name names none first (a router then elects a writer again;
-- until it has, every node takes lockstock's writes): 64 characters would not hold it.
UPDATE designated_writer SET node_name = '', epoch = epoch + 1 WHERE CHAR_LENGTH(node_name) > 64;
ALTER TABLE designated_writer MODIFY node_name VARCHAR(64) NOT NULL DEFAULT '';
