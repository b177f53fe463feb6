DROP TABLE designated_writer;
