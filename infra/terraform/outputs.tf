output "bucket" {
  description = "The bucket: replace geco-example-bucket in k8s/overlays/gpu-cluster with it."
  value       = aws_s3_bucket.geco.bucket
}

output "ray_role_arn" {
  description = "IAM role of the ServiceAccount geco-ray (annotation eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.workload["ray"].arn
}

output "mlflow_role_arn" {
  description = "IAM role of the ServiceAccount geco-mlflow (annotation eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.workload["mlflow"].arn
}

output "s3_uris" {
  description = "Where geco reads and writes (data.shards, geco.backbone.weights, cluster.storage_path, MLFLOW_ARTIFACTS_DESTINATION)."
  value = {
    for key, prefix in local.prefixes : key => "s3://${aws_s3_bucket.geco.bucket}/${prefix}"
  }
}
