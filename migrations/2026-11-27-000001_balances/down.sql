DROP TABLE balance_history;
DROP TABLE user_balance;
