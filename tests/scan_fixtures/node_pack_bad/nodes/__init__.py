"""cuda:0"""
