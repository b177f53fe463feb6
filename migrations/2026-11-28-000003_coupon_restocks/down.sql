DROP TABLE fcfs_coupon_restock;
