-- A node's `@@wsrep_node_name` may be longer than 64 characters (a fully qualified host name,
-- say): the designated-writer row could not name such a node (a claim was refused with "Data
-- too long", or cut to 64 characters where the session's sql_mode is not strict, and then named
-- no node). 255 characters hold any host name; a router never makes a node of a longer name the
-- writer (it takes reads).
ALTER TABLE designated_writer MODIFY node_name VARCHAR(255) NOT NULL DEFAULT '';
