DROP TABLE user_coupon;
DROP TABLE fcfs_coupon;
DROP TABLE coupon;
